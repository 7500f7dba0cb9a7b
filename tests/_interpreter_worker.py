"""One worker process with Triton's interpreter on, for tests of the Triton kernels on CPU tensors.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernels run in a spawned worker
that starts with the variables given; the test process keeps its own environment.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from typing import Callable, Iterator, Optional


@contextlib.contextmanager
def interpreter_worker(environment: dict[str, Optional[str]], ready: Callable[[], None]) -> Iterator[Callable]:
    """A function ``run(body, *args)`` that runs ``body(*args)`` in a worker started with ``environment``
    (a value of ``None`` removes the variable); ``ready`` runs in the worker first (imports, checks)."""
    saved = {name: os.environ.get(name) for name in environment}
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(ready).result(timeout=300)  # the worker starts now, with this environment
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with pool:
        yield lambda body, *args: pool.submit(body, *args).result(timeout=300)
