"""End a multi-process (gloo) run without tripping PyTorch's shutdown race.

The race (pytorch/pytorch#190489, open upstream): gloo's worker threads free a finished
collective after the calling thread has been released. When that drops the last reference to a
tensor whose Python object Python has already let go of, the worker must take the GIL to free
it. If the main thread has meanwhile started interpreter finalisation, CPython ends the worker
with ``pthread_exit``, whose unwinding crosses a ``noexcept`` destructor: ``std::terminate``,
"terminate called without an active exception", SIGABRT. It happens after every file has been
written, yet the launcher reports the rank, and so the whole run, as failed. Measured here on
2-rank CPU DDP (tests/scripts/distributed_train.py): about 1 exit in 8 aborted.

``torch.distributed.destroy_process_group()`` does not prevent it: the group's worker threads
live as long as anything references the group (DDP's reducer does), and gloo has no shutdown
that joins them.

:func:`exit_distributed_run` therefore waits for every rank, flushes logging and the standard
streams, and leaves with ``os._exit``, so no interpreter finalisation runs while gloo's threads
may still be freeing work. It does nothing in a single process, where the race cannot happen.
What it skips in a distributed run: ``atexit`` handlers and object finalisers. Call it only when
the script's work is done and its files are closed.
"""

from __future__ import annotations

import logging
import os
import sys


def exit_distributed_run(exit_code: int = 0) -> None:
    """After a barrier, end this rank with ``os._exit(exit_code)``; return at once if not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to flush
            pass
    os._exit(exit_code)
