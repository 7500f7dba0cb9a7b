"""Checkpoints that are known to be complete, for Trainer and for Accelerate loops alike.

A process killed while it saves leaves a ``checkpoint-N`` folder that looks like a checkpoint but
is not. The rule here: a checkpoint is complete once its marker file :data:`CHECKPOINT_COMPLETE`
exists, and the marker is written last, after every rank has finished writing (a barrier), by the
main process, atomically (temporary file, fsync, rename). Resuming with ``last`` only considers
marked folders; naming an unmarked folder explicitly resumes from it with a warning.

- Trainer: add :class:`MarkCompleteCheckpoints` to the callbacks (Trainer writes ``checkpoint-N``
  in place; the callback's ``on_save`` runs after it).
- Accelerate loops: :func:`save_accelerate_checkpoint` writes ``Accelerator.save_state`` into
  ``checkpoint-N`` and then the marker, which can carry the loop's own state (epoch, history).
- Both: :func:`resolve_checkpoint` turns ``--resume_from_checkpoint`` (``last``/``latest``/
  ``true``, a folder, or nothing) into the folder to resume from; :func:`read_marker` gives back
  what the marker holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: The marker file, written last into a complete checkpoint folder.
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
#: transformers' ``PREFIX_CHECKPOINT_DIR``: checkpoint folders are ``checkpoint-<N>``.
CHECKPOINT_PREFIX = "checkpoint"
#: ``--resume_from_checkpoint`` values that mean "the newest complete checkpoint".
NEWEST = ("last", "latest", "true")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_marker(folder: str | os.PathLike, content: dict[str, Any]) -> None:
    """Write ``content`` as the folder's completeness marker: temporary file, fsync, rename."""
    tmp = os.path.join(folder, f".{CHECKPOINT_COMPLETE}.tmp")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, CHECKPOINT_COMPLETE))


def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """What the completeness marker of ``folder`` holds (``ValueError`` if it has none)."""
    path = os.path.join(folder, CHECKPOINT_COMPLETE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a complete checkpoint (no {CHECKPOINT_COMPLETE})")
    with open(path) as f:
        return json.load(f)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The ``checkpoint-<N>`` folders of ``output_dir`` that carry the marker, by N ascending."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _newest_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The ``checkpoint-<N>`` folder with the largest N, complete or not."""
    if not os.path.isdir(output_dir):
        return None
    numbered = [
        (int(m.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return max(numbered)[1] if numbered else None


def resolve_checkpoint(value: Optional[str], output_dir: str | os.PathLike) -> Optional[str]:
    """The folder ``--resume_from_checkpoint value`` means, or ``None`` for a fresh start.

    ``None``, ``""``, ``false``, ``none``: a fresh start. ``last``/``latest``/``true``: the newest
    complete checkpoint of ``output_dir`` (``ValueError`` when there is none, saying which folder was
    interrupted); an interrupted newer folder is skipped with a warning. A path: that folder
    (``ValueError`` if it does not exist; a warning if it has no marker, as when another tool wrote it).
    """
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in NEWEST:
        complete = complete_checkpoints(output_dir)
        newest = _newest_checkpoint(output_dir)
        if not complete:
            where = f" ({newest} is incomplete: its save was interrupted)" if newest else ""
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete {CHECKPOINT_PREFIX}-* folder in {str(output_dir)!r}{where}"
            )
        if newest is not None and os.path.abspath(newest) != os.path.abspath(complete[-1]):
            logger.warning(
                "skipping %s: its save was interrupted (no %s); resuming from %s", newest, CHECKPOINT_COMPLETE, complete[-1]
            )
        return complete[-1]
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value!r}: no such directory")
    if not os.path.isfile(os.path.join(value, CHECKPOINT_COMPLETE)):
        logger.warning("%s has no %s: it was written by another tool, or its save was interrupted", value, CHECKPOINT_COMPLETE)
    return str(value)


def save_accelerate_checkpoint(accelerator: Any, output_dir: str | os.PathLike, number: int, state: dict[str, Any]) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<number>``, then its marker holding ``state``.

    Every rank calls it. An earlier folder of the same name (an interrupted save) is removed first;
    the marker is written by the main process after every rank has saved.
    """
    folder = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}-{number}")
    if accelerator.is_main_process and os.path.exists(folder):
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_marker(folder, state)
    accelerator.wait_for_everyone()
    return folder


def prune_checkpoints(output_dir: str | os.PathLike, keep: set[str]) -> None:
    """Remove the complete checkpoints of ``output_dir`` that are not in ``keep`` (main process only)."""
    keep_abs = {os.path.abspath(k) for k in keep}
    for path in complete_checkpoints(output_dir):
        if os.path.abspath(path) not in keep_abs:
            shutil.rmtree(path, ignore_errors=True)


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class MarkCompleteCheckpoints(_trainer_callback_base()):
    """Trainer callback: mark each ``checkpoint-<step>`` complete once every rank has written it.

    Trainer writes a checkpoint in place (model, optimizer, scheduler, per-rank RNG, then
    ``trainer_state.json``); ``on_save`` runs after that. After a barrier (every rank's files are
    on disk) the main process writes the marker with the global step and epoch.
    """

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
            if folder.is_dir():
                write_marker(folder, {"global_step": state.global_step, "epoch": state.epoch})
        return control
