"""The compiled library's cache: private folders, a recorded sha256, and nothing loaded that we did not build.

Every test points ADAKV_CACHE_DIR at its own temporary folder; one real build (module fixture) is shared
by the tests that only read it, and the planted-library tests build for real again (a few seconds each).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from adakv_vllm.kernels import library

PLANTED_SOURCE = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) fclose(f);
}
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key_folder(root: Path) -> Path:
    return root / "ext" / library.build_key()


def _library_file(root: Path) -> Path:
    return _key_folder(root) / f"adakv_cpu_decode_{library.build_key()}.so"


def _files(folder: Path) -> list[tuple[str, int]]:
    """(name, mtime) of the build's files; the lock file is reopened (so touched) by every build()."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != library.LOCK_NAME)


@pytest.fixture(autouse=True)
def _fresh_load_cache():
    """_load() is cached per process: never let one test's (un)loaded library leak into another."""
    library._load.cache_clear()
    library._warn_fallback.cache_clear()
    yield
    library._load.cache_clear()
    library._warn_fallback.cache_clear()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The cache root of one real build (created by build() itself)."""
    root = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAKV_CACHE_DIR", str(root))
        library.build()
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(root))
    return root


def test_build_creates_private_folders_and_records_the_hash(built):
    for folder in (built, built / "ext", _key_folder(built)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    so = _library_file(built)
    record = so.with_name(so.name + library.RECORD_SUFFIX)
    assert record.read_text().split() == [_sha256(so), so.name]


def test_second_build_reuses_the_cached_library(built, monkeypatch):
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(built))
    before = _files(_key_folder(built))

    def no_compile(**kwargs):
        raise AssertionError("a verified cached build must not be compiled again")

    monkeypatch.setattr(cpp_extension, "load", no_compile)
    kernel = library.build()
    assert Path(kernel.path) == _library_file(built)
    assert isinstance(kernel.has_avx512(), bool)
    assert _files(_key_folder(built)) == before


def test_library_is_loaded_under_the_build_lock(built, monkeypatch):
    """The hash check and the dlopen happen under one flock: no cooperating builder runs in between."""
    monkeypatch.setenv("ADAKV_CACHE_DIR", str(built))
    seen = []

    def probe(path):
        with open(_key_folder(built) / library.LOCK_NAME) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(path)

    monkeypatch.setattr(library, "Kernel", probe)
    library.build()
    assert seen == [str(_library_file(built))]


@pytest.mark.parametrize("record", ["wrong", "missing"])
def test_planted_library_is_rebuilt_and_never_loaded(built, cache, tmp_path, record):
    """A complete build folder whose .so was swapped (newer than its objects, so ninja sees nothing to
    do) must not be dlopened: its constructor would run before any symbol check."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the planted library")
    marker = tmp_path / "planted-constructor-ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SOURCE % marker)
    planted = tmp_path / "planted.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(planted), str(source)], check=True)

    cache.mkdir(mode=0o700)
    (cache / "ext").mkdir(mode=0o700)
    shutil.copytree(_key_folder(built), _key_folder(cache), symlinks=True)
    target = _library_file(cache)
    shutil.copyfile(planted, target)  # newest file in the folder: ninja considers it up to date
    record_file = target.with_name(target.name + library.RECORD_SUFFIX)
    if record == "wrong":
        record_file.write_text(f"{'0' * 64}  {target.name}\n")
    else:
        record_file.unlink()

    kernel = library.build()
    assert not marker.exists(), "the planted library was loaded"
    assert Path(kernel.path) == target
    assert _sha256(target) != _sha256(planted)
    assert record_file.read_text().split() == [_sha256(target), target.name]
    # the marker mechanism itself works: loading the planted file does run its constructor
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(planted)!r})"], check=True)
    assert marker.exists()


@pytest.mark.parametrize("where", ["root", "ext", "key"])
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=["group", "others", "all"])
def test_folder_writable_by_others_is_refused(cache, monkeypatch, where, mode):
    key = _key_folder(cache)
    key.mkdir(parents=True)
    folder = {"root": cache, "ext": cache / "ext", "key": key}[where]
    folder.chmod(mode)

    def no_compile(**kwargs):
        raise AssertionError("nothing may be built in an unsafe folder")

    monkeypatch.setattr(cpp_extension, "load", no_compile)
    with pytest.raises(library.UnsafeCacheFolder, match="writable by group or others") as error:
        library.build()
    assert f"{folder}:" in str(error.value)


def test_folder_of_another_user_is_refused(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(library.UnsafeCacheFolder, match=f"owned by uid {uid}") as error:
        library.build()
    assert f"{cache}:" in str(error.value)


def test_unsafe_folder_falls_back_in_auto_and_raises_in_fused(cache, monkeypatch, caplog):
    (cache / "ext").mkdir(parents=True)
    (cache / "ext").chmod(0o777)
    monkeypatch.setenv("ADAKV_CPU_ATTENTION", "fused")
    with pytest.raises(library.FusedKernelUnavailable, match="writable by group or others"):
        library.fused_kernel()
    monkeypatch.setenv("ADAKV_CPU_ATTENTION", "auto")
    library.logger.addHandler(caplog.handler)  # vLLM's logging config may stop propagation at "vllm"
    try:
        assert library.fused_kernel() is None
    finally:
        library.logger.removeHandler(caplog.handler)
    assert str(cache / "ext") in caplog.text and "bf16 scratch copy" in caplog.text
