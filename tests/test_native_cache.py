"""The compiled-kernel cache (hf_rlion/kernels/native.py) loads only libraries it built, for this CPU and this package.

Every test works on its own ``HF_RLION_CACHE`` (a copy of one cache built once for this module) with
the modules' "already loaded" state reset, so each load below really goes through the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_rlion import RLion, RLion8bit
from hf_rlion.kernels import cpu_rlion, cpu_rlion8bit, native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")

KERNELS = {"cpu_rlion": (cpu_rlion, "rlion_cpu"), "cpu_rlion8bit": (cpu_rlion8bit, "rlion8bit_cpu")}


def _forget_loaded_kernels(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(cpu_rlion, "_library", None)
    monkeypatch.setattr(cpu_rlion, "_library_loaded", False)
    monkeypatch.setattr(cpu_rlion8bit, "_kernel", None)
    monkeypatch.setattr(cpu_rlion8bit, "_kernel_loaded", False)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache holding both kernels, compiled once for this module; tests work on copies of it."""
    directory = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_RLION_CACHE", str(directory))
        monkeypatch.delenv("HF_RLION_NATIVE", raising=False)
        _forget_loaded_kernels(monkeypatch)
        assert cpu_rlion.kernel_available() and cpu_rlion8bit.kernel_available()
    return directory


@pytest.fixture
def cache(built_cache, tmp_path, monkeypatch):
    """A private copy of the built cache as ``HF_RLION_CACHE``, no kernel loaded from it yet."""
    directory = tmp_path / "cache"
    shutil.copytree(built_cache, directory)
    monkeypatch.setenv("HF_RLION_CACHE", str(directory))
    monkeypatch.delenv("HF_RLION_NATIVE", raising=False)
    _forget_loaded_kernels(monkeypatch)
    return directory


def _compile_library(tmp_path: Path, name: str, code: str) -> bytes:
    source = tmp_path / f"{name}.c"
    source.write_text(code)
    output = tmp_path / f"{name}.so"
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(source), "-o", str(output)], check=True)
    return output.read_bytes()


def _library_with_constructor(tmp_path: Path, marker: Path) -> bytes:
    """A library whose constructor (run by dlopen itself) creates ``marker``."""
    code = (
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'    FILE *f = fopen("{marker}", "w");\n'
        "    if (f) fclose(f);\n"
        "}\n"
        "int rlion_abi_version(void) { return 3; }\n"
    )
    return _compile_library(tmp_path, "planted", code)


def _plant_recorded(cache: Path, stem: str, content: bytes) -> tuple[Path, Path]:
    """Replace the cache entry of ``stem`` with ``content`` and a record that matches it (key and SHA-256)."""
    (record_path,) = cache.glob(f"{stem}-*.json")
    key = json.loads(record_path.read_text())["key"]
    for old in cache.glob(f"{stem}-*.so"):
        old.unlink()
    digest = hashlib.sha256(content).hexdigest()
    library_path = native._library_path(cache, stem, key, digest)
    library_path.write_bytes(content)
    library_path.chmod(0o700)
    record_path.write_text(json.dumps({"key": key, "sha256": digest}))
    return library_path, record_path


def _kernel_atan_matches_torch() -> bool:
    x = torch.linspace(-8, 8, 257)
    return torch.allclose(cpu_rlion.atan(x), torch.atan(x), rtol=0, atol=1e-6)


def test_planted_library_at_the_cached_name_is_not_loaded_and_the_kernel_is_rebuilt(cache, tmp_path):
    marker = tmp_path / "constructor_ran"
    planted = _library_with_constructor(tmp_path, marker)
    libraries = list(cache.glob("rlion_cpu-*.so"))
    assert libraries
    for library in libraries:  # same owner and mode as the real one: only the bytes differ
        library.write_bytes(planted)
    with pytest.warns(UserWarning, match="SHA-256") as warned:
        assert cpu_rlion.kernel_available()
    assert len(warned) == 1
    assert not marker.exists()
    assert _kernel_atan_matches_torch()


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda library, record: library.chmod(0o770), "writable by group or others"),
        (lambda library, record: record.chmod(0o666), "writable by group or others"),
        pytest.param(lambda library, record: os.chown(library, 65534, -1), "owned by uid", marks=ROOT_ONLY),
        pytest.param(lambda library, record: os.chown(record, 65534, -1), "owned by uid", marks=ROOT_ONLY),
    ],
    ids=["library-group-writable", "record-world-writable", "library-owner", "record-owner"],
)
def test_cache_entry_others_could_have_written_is_refused_even_when_its_hash_matches(cache, tmp_path, tamper, message):
    marker = tmp_path / "constructor_ran"
    library, record = _plant_recorded(cache, "rlion_cpu", _library_with_constructor(tmp_path, marker))
    tamper(library, record)
    with pytest.warns(UserWarning, match=message) as warned:
        assert cpu_rlion.kernel_available()
    assert len(warned) == 1
    assert not marker.exists()
    assert _kernel_atan_matches_torch()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o775], ids=oct)
def test_own_cache_directory_writable_by_group_or_others_is_made_private_and_used(cache, mode):
    """Before: refused (torch path) — a cache an older version created under umask 002 (0o775)
    would have cost every later run its kernels."""
    cache.chmod(mode)
    with pytest.warns(UserWarning, match=r"was writable by group or others .*made it private") as warned:
        assert cpu_rlion.kernel_available()
        assert cpu_rlion8bit.kernel_available()
    assert len(warned) == 1
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert _kernel_atan_matches_torch()


def test_a_file_others_could_write_in_a_cache_made_private_is_still_refused(cache):
    """Making the directory private does not vouch for what is in it: each file is checked."""
    cache.chmod(0o775)
    (library,) = cache.glob("rlion_cpu-*.so")
    library.chmod(0o775)
    with pytest.warns(UserWarning) as warned:
        assert cpu_rlion.kernel_available()
    messages = [str(w.message) for w in warned]
    assert any("made it private" in m for m in messages)
    assert any(f"refused the cached library: {library} is writable by group or others" in m for m in messages)


@ROOT_ONLY
@pytest.mark.parametrize("mode", [0o700, 0o775], ids=oct)
def test_cache_directory_owned_by_another_user_is_not_used(cache, mode):
    cache.chmod(mode)
    os.chown(cache, 65534, -1)
    with pytest.warns(UserWarning, match="owned by uid 65534") as warned:
        assert not cpu_rlion.kernel_available()
    assert stat.S_IMODE(cache.stat().st_mode) == mode
    assert not any("made it private" in str(w.message) for w in warned)


CPUINFO_X86 = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu MHz\t\t: 2000.000\n"
    "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vbmi\n\n"
    "processor\t: 1\nvendor_id\t: GenuineIntel\n"
)
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve sve2 bf16\nCPU implementer\t: 0x41\n\n"


@pytest.mark.parametrize(
    "cpuinfo, masked",
    [
        (CPUINFO_X86, CPUINFO_X86.replace(" avx512f avx512bw avx512vbmi", "")),  # a VM masking AVX-512
        (CPUINFO_ARM, CPUINFO_ARM.replace(" sve sve2", "")),
    ],
    ids=["x86-flags", "arm-Features"],
)
def test_cache_key_changes_with_the_cpu_feature_flags_alone(monkeypatch, cpuinfo, masked):
    source = Path(native.__file__).with_name("rlion_cpu.c")

    def key_for(text):
        monkeypatch.setattr(native, "_read_cpuinfo", lambda: text)
        return native.cache_key(source, native._compiler())

    assert key_for(cpuinfo) != key_for(masked)
    assert key_for(cpuinfo) == key_for(cpuinfo.replace("2000.000", "3100.000"))  # clock speed is not identity


def test_cache_key_covers_the_headers_the_kernel_includes(tmp_path):
    """The arctangent both kernels use lives in rlion_atan.h: editing it must rebuild them."""
    kernels = Path(native.__file__).parent
    for name in ("rlion_cpu.c", "rlion_atan.h"):
        shutil.copy(kernels / name, tmp_path / name)
    source, header = tmp_path / "rlion_cpu.c", tmp_path / "rlion_atan.h"
    before = native.cache_key(source, native._compiler())
    header.write_text(header.read_text().replace("ATAN_C8 = -0x1.d4dc8ap-10f", "ATAN_C8 = -0x1.d4dc8cp-10f"))
    assert native.cache_key(source, native._compiler()) != before


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_cpu_identity_holds_this_machines_feature_flags():
    text = Path("/proc/cpuinfo").read_text()
    line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    assert " ".join(line.partition(":")[2].split()) in native._cpu_id()


@pytest.mark.parametrize("module_name", ["cpu_rlion", "cpu_rlion8bit"])
def test_kernel_with_another_abi_signature_is_refused_with_one_warning_and_torch_steps(cache, tmp_path, module_name):
    module, stem = KERNELS[module_name]
    signature_function = "rlion_abi_signature" if module is cpu_rlion else "rlion8bit_abi_signature"
    code = (
        f'const char *{signature_function}(void) {{ return "void rlion_step(i32);void rlion8bit_step_many(i64)"; }}\n'
        "int rlion_abi_version(void) { return 3; }\n"
    )
    _plant_recorded(cache, stem, _compile_library(tmp_path, "other_abi", code))
    with pytest.warns(UserWarning, match="ABI mismatch") as warned:
        assert not module.kernel_available()
        assert not module.kernel_available()
        param = torch.nn.Parameter(torch.ones(4096))
        param.grad = torch.ones(4096)
        optimizer = RLion([param], lr=0.1) if module is cpu_rlion else RLion8bit([param], lr=0.1, min_8bit_size=1)
        optimizer.step()
    assert len(warned) == 1
    assert torch.all(param < 1)  # the torch path took the step


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "OFF", "False", " No "])
def test_hf_rlion_native_disables_the_kernels(cache, monkeypatch, value):
    monkeypatch.setenv("HF_RLION_NATIVE", value)
    with pytest.warns(UserWarning, match="HF_RLION_NATIVE") as warned:
        assert not cpu_rlion.kernel_available()
        assert not cpu_rlion8bit.kernel_available()
    assert len(warned) == 2  # one per kernel


def _native_module_code() -> str:
    """Python code importing hf_rlion/kernels/native.py alone (no torch) as ``native``."""
    path = Path(native.__file__)
    return (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('native', {str(path)!r})\n"
        "native = importlib.util.module_from_spec(spec); spec.loader.exec_module(native)\n"
    )


def test_temporary_file_of_a_killed_build_is_removed_by_the_next_build(cache, tmp_path):
    hanging_compiler = tmp_path / "hanging-cc"
    hanging_compiler.write_text("#!/bin/sh\nexec sleep 120\n")
    hanging_compiler.chmod(0o755)
    build = subprocess.Popen(
        [sys.executable, "-c", _native_module_code() + "native.load('rlion_cpu.c', {}, 'rlion_abi_signature')"],
        env={**os.environ, "CC": str(hanging_compiler), "HF_RLION_CACHE": str(cache)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (temporaries := [p for p in cache.iterdir() if "tmp" in p.name]):
            assert build.poll() is None and time.monotonic() < deadline, "the build never started compiling"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGKILL)  # the build and its compiler, mid-compile
        build.wait()
    assert all(p.exists() for p in temporaries)  # a killed process cleans up nothing
    in_progress = cache / f".tmp-rlion_cpu-{native._host()}-{os.getpid()}-inprogress.so"
    other_host_old = cache / ".tmp-rlion_cpu-otherhost-1-leftover.so"
    for path in (in_progress, other_host_old):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(other_host_old, (hour_ago, hour_ago))
    for record in cache.glob("rlion_cpu-*.json"):
        record.unlink()  # so that the next load builds

    assert cpu_rlion.kernel_available()
    assert not any(p.exists() for p in temporaries) and not other_host_old.exists()
    assert in_progress.exists()  # a live build's file, still young, is left alone


def test_processes_building_at_once_all_load_a_verified_library(tmp_path):
    """DDP ranks start together on an empty cache: each compiles, and the renames leave one consistent entry."""
    code = _native_module_code() + (
        "from pathlib import Path\n"
        "source = Path(native.__file__).with_name('rlion_cpu.c')\n"
        "library, refused = native._open_library(source, native._compiler())\n"
        "assert library.rlion_abi_signature and not refused\n"
    )
    env = {**os.environ, "HF_RLION_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "error"}
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len([n for n in names if n.endswith(".json")]) == 1 and not [n for n in names if "tmp" in n]
