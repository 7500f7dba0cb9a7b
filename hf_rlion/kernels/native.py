"""Build, verify and load the package's small C kernels (CPU fast paths) with the system C compiler.

A kernel is one C file shipped inside ``hf_rlion/kernels/`` (with the headers it includes, ``*.h``
in the same folder). On first use it is compiled with ``cc -O3 -march=native -fopenmp -I <that folder>``
into a cache directory (``$HF_RLION_CACHE``, default ``~/.cache/hf_rlion``) and loaded with
``ctypes``; later processes load the cached library (about a millisecond, no subprocess).

Cache layout, for a kernel ``<stem>.c`` and its cache key ``K`` (:func:`cache_key`: SHA-256 of the
source and the headers beside it, the compiler flags, the compiler binary's path, size and mtime,
and the CPU's feature flags):

- ``<stem>-K[:16]-D[:16].so``: the library, named after ``D``, the SHA-256 of its own bytes;
- ``<stem>-K[:16].json``: its record, ``{"key": K, "sha256": D}``, written when it was built.

A build compiles to a temporary ``.tmp-<stem>-<host>-<pid>-*.so``, renames it to the library name,
then writes the record (temporary file, fsync, rename): every rename is atomic, so processes
racing to build the same kernel (DDP ranks) each end with a complete library and a record that
names one. A build first deletes the temporary files that crashed or killed builds left behind
(ours, and older than :data:`STALE_TEMPORARY_SECONDS` or from a process that no longer exists).

Trust model. The library is loaded with ``dlopen``, which runs its constructors, so nothing is
loaded before it has been checked:

- the cache directory, the record and the library must be owned by the current user and not
  writable by group or others (a new directory is created with mode 0o700; an existing one of
  this user's that group or others can write to is made 0o700, with a warning); the library must
  be a regular file (not a symbolic link);
- the record's key must be this build's key, and the library's bytes must hash to the record's
  SHA-256. The library is opened once, checked and hashed through that descriptor, and loaded from
  the same descriptor (``/proc/self/fd/N`` on Linux), so it cannot be swapped between the check and
  the load;
- after loading, the kernel's exported ``*_abi_signature()`` string (the C prototypes of its
  exported functions) must equal the prototypes the Python module declares with ``ctypes``.

A cached library that fails a check is not loaded: it is rebuilt (one warning names what was
refused). A directory that fails its check, a failed build, an ABI mismatch, no compiler, or
``HF_RLION_NATIVE`` set to 0/false/no/off → :func:`load` returns ``None`` and the caller uses its
pure-torch path (one warning naming the reason).

What this protects against: another user who can write to the cache directory (a shared or
group-writable cache) cannot get code loaded into this process (their files are refused, and a
cache directory owned by another user is not used at all); a planted, truncated or corrupted library at the
expected name is refused by its hash; a library built for another CPU (a VM that masks AVX-512
under the same model name) has another key. What it cannot protect against: anyone who can write
files as this user (or root) can write a matching library and record, and could as well edit this
package; the hash is an integrity check against accidents and foreign files, not a signature.

CPU identity. ``-march=native`` makes the compiler ask the CPU (CPUID on x86) which instructions it
has and which model it is; the kernel's ``/proc/cpuinfo`` reports the same CPUID bits (minus those
the OS does not enable, which the compilers also drop). The key therefore takes the first
processor's ``flags`` line (``Features`` on ARM and others) together with its vendor, family,
model and model name (which select ``-mtune``), read from ``/proc/cpuinfo`` without a subprocess;
where there is no such file, the platform's machine and processor names.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
_COMPILE_TIMEOUT_SECONDS = 300
#: A temporary build file older than this is left over from a crashed build (a compile is given
#: :data:`_COMPILE_TIMEOUT_SECONDS` at most) and is deleted by the next build.
STALE_TEMPORARY_SECONDS = 15 * 60
#: ``HF_RLION_NATIVE`` values (case-insensitive) that turn the C kernels off.
DISABLING_VALUES = frozenset({"0", "false", "no", "off"})
#: /proc/cpuinfo fields of the first processor that decide what ``-march=native`` compiles for.
_CPU_FIELDS = (
    "vendor_id", "cpu family", "model", "model name", "flags",  # x86
    "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part",  # ARM
    "isa", "cpu",  # RISC-V, POWER
)
_FEATURE_FIELDS = ("flags", "Features", "isa")
_TEMPORARY = re.compile(r"\.tmp-(?P<stem>.+)-(?P<host>\w*)-(?P<pid>\d+)-\w+\.(so|json)")

#: A kernel's declared functions: name -> (ctypes restype, ctypes argtypes).
Declarations = Mapping[str, tuple[Any, Sequence[Any]]]

_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
# descriptors of the loaded libraries, kept open: glibc recognises an already loaded library by the
# name it was opened under, so a reused /proc/self/fd/N would return the earlier library
_open_descriptors: list[int] = []


class UntrustedFile(Exception):
    """A cache entry that failed a check (owner, mode, key, hash) and must not be loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("HF_RLION_CACHE", Path.home() / ".cache" / "hf_rlion"))


def disabled_by_environment() -> bool:
    return os.environ.get("HF_RLION_NATIVE", "").strip().lower() in DISABLING_VALUES


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


def _read_cpuinfo() -> str:
    """The first processor's block of /proc/cpuinfo ("" where there is none)."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if lines:
                        break
                    continue
                lines.append(line)
    except OSError:
        pass
    return "".join(lines)


def _cpu_id() -> str:
    """The CPU as ``-march=native`` sees it: feature flags and model (see the module docstring)."""
    fields: dict[str, str] = {}
    for line in _read_cpuinfo().splitlines():
        name, colon, value = line.partition(":")
        name = name.strip()
        if colon and name in _CPU_FIELDS:
            fields.setdefault(name, " ".join(value.split()))
    machine = platform.machine()
    if not any(name in fields for name in _FEATURE_FIELDS):
        return f"{machine}; {platform.processor()}"  # platform.processor() may run `uname -p`
    return "; ".join([machine] + [f"{name}: {fields[name]}" for name in _CPU_FIELDS if name in fields])


def headers(source: Path) -> list[Path]:
    """The headers a kernel may include: every ``*.h`` beside its source (compiled with ``-I`` that folder)."""
    return sorted(source.parent.glob("*.h"))


def cache_key(source: Path, compiler: str) -> str:
    """SHA-256 (hex) of the source and its :func:`headers` (names and contents), the flags, the
    compiler's identity and the CPU's identity."""
    key = hashlib.sha256()
    included = [part for header in headers(source) for part in (header.name.encode(), header.read_bytes())]
    identity = (" ".join(_FLAGS).encode(), _compiler_id(compiler).encode(), _cpu_id().encode())
    for part in (source.read_bytes(), *included, *identity):
        key.update(len(part).to_bytes(8, "little"))
        key.update(part)
    return key.hexdigest()


def _record_path(directory: Path, stem: str, key: str) -> Path:
    return directory / f"{stem}-{key[:16]}.json"


def _library_path(directory: Path, stem: str, key: str, digest: str) -> Path:
    return directory / f"{stem}-{key[:16]}-{digest[:16]}.so"


def _check_owner_and_mode(st: os.stat_result, path: Path) -> None:
    if st.st_uid != os.geteuid():
        raise UntrustedFile(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFile(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o})")


def _secure_cache_dir() -> Path:
    """The cache directory (created with mode 0o700), after checking its owner and mode.

    A directory of this user's that group or others can write to (one created under umask 002 by
    an older version of this package) is made private (mode 0o700) with a warning, and used: the
    files in it are checked one by one anyway (owner, mode, recorded hash), and no other user can
    create a file owned by this one. A directory owned by someone else is refused.
    """
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedFile(f"{directory} is not a directory")
    if st.st_uid == os.geteuid() and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(directory, 0o700)
        warnings.warn(
            f"hf_rlion: the kernel cache {directory} was writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):#o}); made it private (mode 0o700)"
        )
        st = os.stat(directory)
    try:
        _check_owner_and_mode(st, directory)
    except UntrustedFile as err:
        raise UntrustedFile(f"{err}; make it private (chmod 700) or set HF_RLION_CACHE to a private directory") from None
    return directory


def _open_checked(path: Path) -> int:
    """A read-only descriptor of ``path``, a regular file owned by this user and not writable by others.

    Raises ``FileNotFoundError`` when there is no such file and :class:`UntrustedFile` when it fails a check.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UntrustedFile(f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(f"{path} is not a regular file")
        _check_owner_and_mode(st, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _digest_of_descriptor(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _open_cached(directory: Path, stem: str, key: str) -> tuple[Optional[int], Optional[Path]]:
    """A descriptor of the verified cached library and its path, or ``(None, None)`` if none is cached.

    Raises :class:`UntrustedFile` when the record or the library fails a check.
    """
    record_path = _record_path(directory, stem, key)
    try:
        fd = _open_checked(record_path)
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(os.read(fd, 4096))
    except ValueError:
        raise UntrustedFile(f"{record_path} is not a valid record") from None
    finally:
        os.close(fd)
    if not isinstance(record, dict) or record.get("key") != key:
        raise UntrustedFile(f"{record_path} records another cache key")
    digest = record.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UntrustedFile(f"{record_path} records no valid SHA-256")
    library_path = _library_path(directory, stem, key, digest)
    try:
        fd = _open_checked(library_path)
    except FileNotFoundError:
        return None, None
    try:
        if _digest_of_descriptor(fd) != digest:
            raise UntrustedFile(f"{library_path} does not match the SHA-256 recorded at build time")
    except BaseException:
        os.close(fd)
        raise
    return fd, library_path


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname())[:64]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete this user's temporary build files left in ``directory`` by builds that died; returns them.

    A temporary file is stale when it is older than :data:`STALE_TEMPORARY_SECONDS`, or when it was
    made on this host by a process that no longer exists.
    """
    removed = []
    host, now = _host(), time.time()
    for entry in os.scandir(directory):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                continue
            orphaned = match["host"] == host and not _process_exists(int(match["pid"]))
            if orphaned or now - st.st_mtime > STALE_TEMPORARY_SECONDS:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # another process removed it first
    return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _build(directory: Path, source: Path, compiler: str, key: str) -> None:
    """Compile ``source`` into the cache, then write its record; both land by atomic renames."""
    remove_stale_temporaries(directory)
    prefix = f".tmp-{source.stem}-{_host()}-{os.getpid()}-"
    fd, library_tmp = tempfile.mkstemp(prefix=prefix, suffix=".so", dir=directory)
    os.close(fd)
    record_tmp = None
    try:
        result = subprocess.run(
            [compiler, *_FLAGS, "-I", str(source.parent), str(source), "-o", library_tmp, "-lm"],
            capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}:\n{result.stderr[-2000:]}")
        os.chmod(library_tmp, 0o700)  # the linker creates its output with the umask's mode
        fd = os.open(library_tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            digest = _digest_of_descriptor(fd)
        finally:
            os.close(fd)
        os.replace(library_tmp, _library_path(directory, source.stem, key, digest))
        fd, record_tmp = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(record_tmp, _record_path(directory, source.stem, key))
        _fsync_directory(directory)
    finally:
        for tmp in (library_tmp, record_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _dlopen(fd: int, path: Path) -> ctypes.CDLL:
    """Load the library behind the verified descriptor ``fd`` (by the descriptor where the OS allows)."""
    by_descriptor = f"/proc/self/fd/{fd}"
    if not os.path.exists(by_descriptor):
        os.close(fd)
        return ctypes.CDLL(str(path))
    try:
        library = ctypes.CDLL(by_descriptor)
    except BaseException:
        os.close(fd)
        raise
    _open_descriptors.append(fd)
    return library


def _open_library(source: Path, compiler: str) -> tuple[ctypes.CDLL, str]:
    """The verified (built if need be) library and the reason a cached entry was refused ("" if none)."""
    directory = _secure_cache_dir()
    key = cache_key(source, compiler)
    refused = ""
    try:
        fd, path = _open_cached(directory, source.stem, key)
    except UntrustedFile as err:
        fd, path, refused = None, None, str(err)
    if fd is None:
        _build(directory, source, compiler, key)
        fd, path = _open_cached(directory, source.stem, key)
        if fd is None:
            raise RuntimeError(f"the library built from {source.name} disappeared from {directory}")
    return _dlopen(fd, path), refused


_TYPE_CODES = {"P": "p", "z": "p", "Z": "p", "f": "f32", "d": "f64"}


def _type_name(ctype: Any) -> str:
    """``void``, ``p`` (any pointer), ``i8``..``i64``/``u8``..``u64`` or ``f32``/``f64`` for a ctypes type."""
    if ctype is None:
        return "void"
    if isinstance(ctype, type) and issubclass(ctype, ctypes._Pointer):
        return "p"
    code = getattr(ctype, "_type_", None)
    if code in _TYPE_CODES:
        return _TYPE_CODES[code]
    if isinstance(code, str) and code in "bhilqBHILQ":
        return f"{'i' if code.islower() else 'u'}{8 * ctypes.sizeof(ctype)}"
    raise TypeError(f"no ABI name for {ctype!r}")


def signature(functions: Declarations) -> set[str]:
    """The prototypes ``"<ret> <name>(<arg>,...)"`` of the declared functions (the C side's format)."""
    return {
        f"{_type_name(restype)} {name}({','.join(_type_name(a) for a in argtypes)})"
        for name, (restype, argtypes) in functions.items()
    }


def _abi_mismatch(library: ctypes.CDLL, functions: Declarations, signature_function: str) -> str:
    """Declares ``functions`` on ``library``; "" if its ABI signature matches them, else what differs."""
    try:
        exported = getattr(library, signature_function)
    except AttributeError:
        return f"the library exports no {signature_function}()"
    exported.restype, exported.argtypes = ctypes.c_char_p, []
    theirs = {entry.strip() for entry in exported().decode().split(";") if entry.strip()}
    ours = signature(functions)
    if theirs != ours:
        return (
            f"ABI mismatch: the C kernel exports {sorted(theirs - ours)}, "
            f"the Python side declares {sorted(ours - theirs)}"
        )
    for name, (restype, argtypes) in functions.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, list(argtypes)
    return ""


def load(source_name: str, functions: Declarations, signature_function: str) -> Optional[ctypes.CDLL]:
    """The verified library for ``hf_rlion/kernels/<source_name>`` with ``functions`` declared, or ``None``.

    ``signature_function`` names the kernel's exported ``const char *f(void)`` that lists the
    prototypes of its functions, separated by ";", in the format of :func:`signature`; the library
    is used only if they equal the declared ``functions``. At most one warning per kernel and process.
    """
    with _lock:
        if source_name in _loaded:
            return _loaded[source_name]
        library, refused = None, ""
        if disabled_by_environment():
            reason = f"HF_RLION_NATIVE={os.environ['HF_RLION_NATIVE']}"
        elif (compiler := _compiler()) is None:
            reason = "no C compiler (cc/gcc/clang) found"
        else:
            try:
                library, refused = _open_library(Path(__file__).with_name(source_name), compiler)
                reason = _abi_mismatch(library, functions, signature_function)
                if reason:
                    library = None
            except (AttributeError, OSError, RuntimeError, subprocess.SubprocessError, UntrustedFile) as err:
                reason = str(err)
        refused_note = f"refused the cached library: {refused}" if refused else ""
        if library is None:
            note = f"; {refused_note}" if refused else ""
            warnings.warn(f"hf_rlion: CPU kernel {source_name} unavailable ({reason}{note}); using the torch path")
        elif refused:
            warnings.warn(f"hf_rlion: {refused_note}; rebuilt {source_name}")
        _loaded[source_name] = library
        return library


def pointer_array(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (``void **``), for passing tensor lists to a kernel."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
