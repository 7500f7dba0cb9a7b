"""Build and load the package's small C kernels (CPU fast paths) with the system C compiler.

A kernel is one C file shipped inside ``hf_rlion/``. On first use it is compiled with
``cc -O3 -march=native -fopenmp`` into a cache directory (``$HF_RLION_CACHE``, default
``~/.cache/hf_rlion``), keyed by the source, the flags, the compiler binary (path, size, mtime)
and the CPU, and loaded with ``ctypes``. Later processes load the cached library (milliseconds,
no subprocess). Compilation writes a
temporary file and renames it, so several processes (DDP ranks) may race safely.

No compiler, a failed build, or ``HF_RLION_NATIVE=0`` → :func:`load` returns ``None`` and
callers use their pure-torch path (with one warning naming the reason).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("HF_RLION_CACHE", Path.home() / ".cache" / "hf_rlion"))


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_id(compiler: str) -> str:
    """Identifies the compiler binary without running it (a fresh process should not pay a fork+exec).

    The resolved path, size and modification time: an upgraded compiler gets a new cache entry.
    """
    path = shutil.which(compiler) or compiler
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return path


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(source: Path, compiler: str) -> Path:
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join(_FLAGS).encode(), _compiler_id(compiler).encode(), _cpu_id().encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source_name: str) -> Optional[ctypes.CDLL]:
    """The compiled library for ``hf_rlion/<source_name>``, or ``None`` when it cannot be had."""
    with _lock:
        if source_name in _loaded:
            return _loaded[source_name]
        library = None
        if os.environ.get("HF_RLION_NATIVE", "1") == "0":
            reason = "HF_RLION_NATIVE=0"
        elif (compiler := _compiler()) is None:
            reason = "no C compiler (cc/gcc/clang) found"
        else:
            try:
                library = ctypes.CDLL(str(_build(Path(__file__).with_name(source_name), compiler)))
                reason = ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                reason = str(err)
        if library is None:
            warnings.warn(f"hf_rlion: CPU kernel {source_name} unavailable ({reason}); using the torch path")
        _loaded[source_name] = library
        return library


def pointer_array(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (``void **``), for passing tensor lists to a kernel."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
