"""Run any training script with hf_rlion's optimizer names registered.

    python -m hf_rlion.launch SCRIPT.py [ARGS...]
    accelerate launch -m hf_rlion.launch SCRIPT.py [ARGS...]

The script runs as ``__main__`` with ``sys.argv = [SCRIPT.py, ARGS...]``, exactly as
``python SCRIPT.py ARGS...`` would run it, except that ``--optim rlion`` (and ``rlion_8bit``,
``paged_rlion_8bit``) are valid choices of transformers' ``HfArgumentParser`` and ``--opt rlion``
(and ``rlion8bit``, ``lookahead_rlion``) of timm's ``train.py``. When the script
returns normally in a multi-process run, each rank waits for the others and exits with
:func:`hf_rlion.distributed_exit.exit_distributed_run`, so no rank aborts at interpreter exit.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m hf_rlion.launch SCRIPT.py [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"hf_rlion.launch: no such script: {script!r}\n{USAGE}")
    import hf_rlion

    hf_rlion.register_with_transformers()
    hf_rlion.register_with_timm()
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    from hf_rlion.distributed_exit import exit_distributed_run

    exit_distributed_run()


if __name__ == "__main__":
    main()
