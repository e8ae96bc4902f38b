"""The compiled CPU library: JIT build, cache and loader, and the ctypes mirror of its entry points.

One shared library holds every compiled CPU kernel (csrc/): the fused paged attention
(cpu_decode.cpp), the page encoder (cpu_seal.cpp), the page decoder of the scratch path
(cpu_unpack.cpp), the quantization-error feature (cpu_qerr.cpp), the within-block attention
of the `attention` policy (cpu_block_attn.cpp), the staging writes (cpu_stage.cpp) and the seal
planner (cpu_plan.cpp);
csrc/cpu_quant.h holds the quantizer they share (rotation, codebooks, clip search), csrc/cpu_layout.h
the page-format numbers read alike by reader and writer. Their launchers are in kernels/cpu.py.

Why C++ (torch.utils.cpp_extension) and not numba or torch.compile: the kernel's work is a
data-dependent walk (each page's bit map decides where every record lies), 2/3/4/8-bit unpacking in
registers, and an online softmax shared by the 3 query heads of a KV head. numba is installed but
cannot run inside torch's OpenMP pool (its own threading layer would be a second pool on cores vLLM
has bound) and has no AVX-512 intrinsics for the unpack; torch.compile's CPU codegen would have to
materialise the gathered records, i.e. the scratch copy this kernel exists to avoid. C++ gives both
the intrinsics and OpenMP on torch's own threads.

Build: torch.utils.cpp_extension.load (ninja), as one plain shared library with C entry points
called through ctypes. The source includes no torch header, so a build takes seconds, not the
minutes torch/extension.h costs; a cached build loads in well under a second. Cached per source +
flags + torch version + CPU flags under $ADAKV_CACHE_DIR/ext/<hash> (default ~/.cache/adakv/ext/<hash>),
behind an flock so that concurrent processes build once.

Trust: loading a shared library runs its code (constructors run at dlopen, before any symbol check),
so whoever can write where it lies can run code in every process that loads it. Hence:
  - the cache root, ext/ and ext/<hash> are created 0700, and a folder among them that another user
    owns or that group or others can write is refused (UnsafeCacheFolder);
  - right after a build, the .so's sha256 is recorded beside it (<name>.so.sha256, written atomically);
    a .so is loaded only when its sha256 equals that record, else the folder is emptied and rebuilt;
  - the check and the dlopen happen under the build flock, so no cooperating process swaps the file in
    between. A build runs in an emptied folder, never over files we have not verified.

Threads: the kernels open an OpenMP region of torch.get_num_threads() threads, exactly what
at::parallel_for does under torch's OpenMP backend. The library's libgomp.so.1 dependency resolves,
by SONAME, to the copy torch has already loaded (checked by test_cpu_decode), so it runs on the thread
team vLLM's CPU worker binds to its cores, not on a second runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import time
from pathlib import Path

import torch

from adakv_vllm import envs
from adakv_vllm.quant.precision import PRECISIONS
from adakv_vllm.quant.reference import MAX_ROTATED_ABS

logger = logging.getLogger("vllm.adakv.cpu")

CSRC = Path(__file__).with_name("csrc")
# One library: the fused decode attention, the store's quantization-error feature, page encoder,
# page decoder, within-block attention, staging writes and seal planner.
SOURCES = tuple(
    CSRC / name
    for name in (
        "cpu_decode.cpp",
        "cpu_qerr.cpp",
        "cpu_seal.cpp",
        "cpu_unpack.cpp",
        "cpu_block_attn.cpp",
        "cpu_stage.cpp",
        "cpu_plan.cpp",
    )
)
# part of the build key, not compiled alone
HEADERS = tuple(CSRC / name for name in ("cpu_layout.h", "cpu_quant.h"))
# -ffp-contract=off: no a*b+c is fused into an FMA behind the source's back, so every fp32 step of
# the quantizer rounds as the oracle's torch ops do (explicit FMA intrinsics are unaffected)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
LOCK_NAME = "adakv-build.lock"
# beside the .so: "<sha256>  <name>.so", the sha256sum format
RECORD_SUFFIX = ".sha256"


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel was asked for (ADAKV_CPU_ATTENTION=fused) but cannot be built or loaded."""


class UnsafeCacheFolder(RuntimeError):
    """A folder the library would be built in or loaded from is not private to this user."""


def _cpu_signature() -> str:
    """The CPU's ISA flags: -march=native objects must not be shared between different CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_key() -> str:
    h = hashlib.sha256(b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS)))
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, platform.machine(), _cpu_signature()):
        h.update(part.encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An flock held while building: released by the kernel if the process dies, unlike a lock file."""
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# cpu_layout.h: kLayoutNumbers, the length of cpu.layout_numbers()
LAYOUT_NUMBERS = 7 + 3 * len(PRECISIONS)
# cpu_quant.h: a codebook's capacity (8 bits: 256 levels), its clip factors (one SIMD lane each), and
# the codebooks that fit one register (searched over clip factors; decoded by a permute)
MAX_LEVELS, MAX_CLIP_FACTORS, LANE_LEVELS = 256, 16, 16


class Codebook(ctypes.Structure):
    """Mirror of `struct Codebook` in cpu_quant.h: one quantized precision's quant/levels.py tables."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("num_levels", "num_clip_factors", "zero_code")),
        ("levels", ctypes.c_float * MAX_LEVELS),
        ("thresholds", ctypes.c_float * MAX_LEVELS),
        ("clip_factors", ctypes.c_float * MAX_CLIP_FACTORS),
    ]


class Codebooks(ctypes.Structure):
    """Mirror of `struct Codebooks` in cpu_quant.h: one Codebook per quantized precision code."""

    _fields_ = [("code", Codebook * sum(p.is_quantized for p in PRECISIONS))]


class DecodeArgs(ctypes.Structure):
    """Mirror of `struct Args` in cpu_decode.cpp, field by field."""

    _fields_ = [
        ("layout", ctypes.c_int64 * LAYOUT_NUMBERS),
        ("codebooks", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("head_size", "num_heads", "num_kv_heads", "num_tokens")),
        *((name, ctypes.c_int64) for name in ("num_seqs", "num_blocks", "num_slots")),
        ("pages", ctypes.c_void_p),
        ("page_stride", ctypes.c_int64),
        ("staging_key", ctypes.c_void_p),
        ("staging_value", ctypes.c_void_p),
        ("staging_slot", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("block_table_i64", "block_table_stride", "block_table_width")),
        ("seq_lens", ctypes.c_void_p),
        ("query_start_loc", ctypes.c_void_p),
        ("seq_lens_i64", ctypes.c_int64),
        ("query_start_loc_i64", ctypes.c_int64),
        ("query", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("query_dtype", "q_stride_t", "q_stride_h")),
        ("out", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("out_dtype", "out_stride_t", "out_stride_h")),
        ("scale", ctypes.c_double),
        *((name, ctypes.c_int64) for name in ("pages_per_split", "force_scalar", "num_threads")),
        *((name, ctypes.c_void_p) for name in ("received", "seen")),
    ]


class SealArgs(ctypes.Structure):
    """Mirror of `struct SealArgs` in cpu_seal.cpp, field by field."""

    _fields_ = [
        ("layout", ctypes.c_int64 * LAYOUT_NUMBERS),
        ("codebooks", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("head_size", "num_kv_heads", "num_pages", "num_tokens")),
        *((name, ctypes.c_void_p) for name in ("key", "value")),
        ("num_slots", ctypes.c_int64),
        *((name, ctypes.c_void_p) for name in ("slots", "key_bits", "value_bits")),
        ("pages", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("page_stride", "num_rows")),
        ("rows", ctypes.c_void_p),
        ("clamp", ctypes.c_int64),
        ("clamp_abs", ctypes.c_double),
        ("clamp_bits", ctypes.c_int64 * 2),
        *((name, ctypes.c_double) for name in ("quantized_abs", "rotated_abs")),
        ("num_threads", ctypes.c_int64),
    ]


class UnpackArgs(ctypes.Structure):
    """Mirror of `struct UnpackArgs` in cpu_unpack.cpp, field by field."""

    _fields_ = [
        ("layout", ctypes.c_int64 * LAYOUT_NUMBERS),
        ("codebooks", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("head_size", "num_kv_heads", "num_pages")),
        ("pages", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("page_stride", "num_blocks")),
        *((name, ctypes.c_void_p) for name in ("block_ids", "rows", "out_key", "out_value")),
        *((name, ctypes.c_int64) for name in ("num_rows", "force_scalar", "num_threads")),
    ]


class QerrArgs(ctypes.Structure):
    """Mirror of `struct QerrArgs` in cpu_qerr.cpp, field by field."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("codebooks", "x")),
        *((name, ctypes.c_int64) for name in ("dtype", "rows", "head_size", "group_size")),
        *((name, ctypes.c_int64) for name in ("rotate_shift", "hadamard_log2")),
        *((name, ctypes.c_void_p) for name in ("codes", "bits")),
        ("num_precisions", ctypes.c_int64),
        *((name, ctypes.c_double) for name in ("quantized_abs", "rotated_abs")),
        ("out", ctypes.c_void_p),
        ("num_threads", ctypes.c_int64),
    ]


class BlockAttnArgs(ctypes.Structure):
    """Mirror of `struct BlockAttnArgs` in cpu_block_attn.cpp, field by field."""

    _fields_ = [
        ("query", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("num_rows", "query_token_stride", "query_head_stride")),
        ("key", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("dtype", "num_slots", "block_size", "num_heads")),
        *((name, ctypes.c_int64) for name in ("num_kv_heads", "head_size")),
        *((name, ctypes.c_void_p) for name in ("rows", "slots", "offsets")),
        ("n", ctypes.c_int64),
        ("scale", ctypes.c_double),
        ("received", ctypes.c_void_p),
        ("num_threads", ctypes.c_int64),
    ]


# the kernel's dtype codes (cpu_decode.cpp: enum Dtype)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_STATUS = {1: "inconsistent arguments", 2: "a page's bit map, a block id or a staging slot is out of range"}
# cpu_seal.cpp's and cpu_qerr.cpp's status codes -> the error the oracle (reference.py) raises
_QUANT_ERRORS = {
    1: "inconsistent arguments",
    2: f"bits must be in {[p.bits for p in PRECISIONS]}",
    3: "bits exceed the page budget",
    4: "slots must be rows of key/value, block_ids distinct rows of out",
    5: "input contains NaN or inf; AdaKV cannot cache non-finite values",
    6: f"rotated values beyond +-{MAX_ROTATED_ABS:g} cannot be stored in a quantized record "
    "(fp16 scale); store them at 16 bits",
}
# cpu_stage.cpp's status codes (nothing is written on any of them)
_STATUS_STAGE = {1: "inconsistent arguments", 2: "a source or destination row is out of range"}
# cpu_plan.cpp's status codes (3, a value that is not finite, is answered by the oracle)
_STATUS_PLAN = {1: "inconsistent arguments", 2: "a page's tokens at the lowest precision exceed the budget"}
# cpu_unpack.cpp's status codes (nothing is written on any of them)
_UNPACK_ERRORS = {
    1: (ValueError, "inconsistent arguments"),
    2: (RuntimeError, "a page's bit map is corrupt (a nibble that is no precision code, or past the page)"),
    3: (ValueError, "block_ids must be rows of pages, out_rows distinct rows of out_key/out_value"),
}


class Kernel:
    """The loaded library: `run(args)`, `relative_errors(...)`, `seal(args)`, `unpack(args)`,
    `block_attention(args)`, `stage_rows(...)`, `plan_pages(...)` and `has_avx512()`."""

    def __init__(self, path: str):
        self.path = path
        self._lib = ctypes.CDLL(path)
        self._lib.adakv_paged_attention.argtypes = [ctypes.POINTER(DecodeArgs)]
        self._lib.adakv_paged_attention.restype = ctypes.c_int
        self._lib.adakv_relative_errors.argtypes = [ctypes.POINTER(QerrArgs)]
        self._lib.adakv_relative_errors.restype = ctypes.c_int
        self._lib.adakv_seal.argtypes = [ctypes.POINTER(SealArgs)]
        self._lib.adakv_seal.restype = ctypes.c_int
        self._lib.adakv_unpack.argtypes = [ctypes.POINTER(UnpackArgs)]
        self._lib.adakv_unpack.restype = ctypes.c_int
        self._lib.adakv_block_attention.argtypes = [ctypes.POINTER(BlockAttnArgs)]
        self._lib.adakv_block_attention.restype = ctypes.c_int
        self._lib.adakv_stage_rows.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # destinations, their rows
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # key, value, their strides
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # sources, n
        ]  # fmt: skip
        self._lib.adakv_stage_rows.restype = ctypes.c_int
        self._lib.adakv_plan_pages.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # weight, distortion, cost
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]  # fmt: skip
        self._lib.adakv_plan_pages.restype = ctypes.c_int
        mirrors = (
            ("adakv_args_size", DecodeArgs),
            ("adakv_seal_args_size", SealArgs),
            ("adakv_unpack_args_size", UnpackArgs),
            ("adakv_block_attn_args_size", BlockAttnArgs),
            ("adakv_qerr_args_size", QerrArgs),
            ("adakv_codebooks_size", Codebooks),
        )
        for sizer, mirror in mirrors:
            getattr(self._lib, sizer).restype = ctypes.c_int64
            if getattr(self._lib, sizer)() != ctypes.sizeof(mirror):
                raise RuntimeError(
                    f"{path}: {sizer} does not match library.py's {mirror.__name__} (stale build?)"
                )

    def relative_errors(self, args: QerrArgs) -> None:
        """The quantization-error feature (see cpu.relative_errors); ValueError as reference.py raises it."""
        status = self._lib.adakv_relative_errors(ctypes.byref(args))
        if status:
            raise ValueError(_QUANT_ERRORS.get(status, f"AdaKV relative_errors: status {status}"))

    def seal(self, args: SealArgs) -> None:
        """Encode pages (see encode_pages); ValueError as PageCodec.encode raises it."""
        status = self._lib.adakv_seal(ctypes.byref(args))
        if status:
            raise ValueError(_QUANT_ERRORS.get(status, f"AdaKV seal: status {status}"))

    def unpack(self, args: UnpackArgs) -> None:
        """Decode pages (see decode_pages); ValueError on arguments, RuntimeError on a corrupt page."""
        status = self._lib.adakv_unpack(ctypes.byref(args))
        if status:
            error, message = _UNPACK_ERRORS.get(status, (RuntimeError, f"AdaKV unpack: status {status}"))
            raise error(message)

    def block_attention(self, args: BlockAttnArgs) -> None:
        """Within-block attention (see cpu.block_attention); ValueError on bad arguments."""
        status = self._lib.adakv_block_attention(ctypes.byref(args))
        if status:
            raise ValueError(f"AdaKV block attention: {_STATUS.get(status, status)}")

    def stage_rows(self, *args: int) -> None:
        """Staging writes (see cpu.StageRows): the C entry point's arguments, in its order."""
        status = self._lib.adakv_stage_rows(*args)
        if status:
            raise ValueError(f"AdaKV staging write: {_STATUS_STAGE.get(status, status)}")

    def plan_pages(self, *args: int) -> bool:
        """The seal planner (see cpu.plan_pages): the C entry point's arguments, in its order.
        False when a weight or distortion is not finite (nothing planned); ValueError as
        planner.allocate raises it."""
        status = self._lib.adakv_plan_pages(*args)
        if status == 3:
            return False
        if status:
            raise ValueError(_STATUS_PLAN.get(status, f"AdaKV planner: status {status}"))
        return True

    def has_avx512(self) -> bool:
        return bool(self._lib.adakv_has_avx512())

    def run(self, args: DecodeArgs) -> None:
        status = self._lib.adakv_paged_attention(ctypes.byref(args))
        if status:
            raise RuntimeError(f"AdaKV fused attention: {_STATUS.get(status, status)}")


def build() -> Kernel:
    """Compile (or load the verified cached build of) the library. Safe when several processes call it.

    Raises UnsafeCacheFolder when the cache root, ext/ or ext/<key> is owned by another user or
    writable by group or others; a cached .so whose sha256 is not the one recorded when it was built
    is never loaded, but discarded and rebuilt.
    """
    key = build_key()
    root = envs.cache_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    directory = root / "ext" / key
    for folder in (root, root / "ext", directory):
        _private_folder(folder)
    name = f"adakv_cpu_decode_{key}"
    path = directory / f"{name}.so"
    record = path.with_name(path.name + RECORD_SUFFIX)
    with _exclusive(directory / LOCK_NAME):
        if not _matches_record(path, record):
            _compile(directory, name, path)
            _write_record(record, path)
        return Kernel(str(path))


def _private_folder(folder: Path) -> None:
    """Create `folder` 0700 when missing; UnsafeCacheFolder unless this user owns it and only it can write."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = folder.stat()
    advice = "use a private folder (ADAKV_CACHE_DIR) or fix it: chown to this user, chmod 700"
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheFolder(f"{folder}: not a folder; {advice}")
    if info.st_uid != os.geteuid():
        raise UnsafeCacheFolder(
            f"{folder}: owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}); the compiled "
            f"library is loaded from it, so its owner could run code in this process; {advice}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheFolder(
            f"{folder}: writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); the compiled "
            f"library is loaded from it, so they could run code in this process; {advice}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matches_record(path: Path, record: Path) -> bool:
    """True when `path` exists and its sha256 is the one recorded beside it when it was built."""
    if not path.exists():
        return False
    try:
        recorded = record.read_text().split()[0]
    except (OSError, IndexError):
        logger.info("%s has no build record; rebuilding it rather than trusting it", path)
        return False
    actual = _sha256(path)
    if actual != recorded:
        logger.warning(
            "%s does not match the sha256 recorded when it was built (%s, recorded %s); "
            "not loading it, rebuilding", path, actual, recorded,
        )  # fmt: skip
        return False
    return True


def _compile(directory: Path, name: str, path: Path) -> None:
    """Build the library into `directory`, emptied first (but for our lock): no leftover object,
    build.ninja or .so of unknown origin takes part. Call under the build flock.

    Emptying also removes cpp_extension's own baton file ("lock"), which survives a killed build and
    would block forever; under our flock no other process is building here, so a leftover one is stale.
    """
    from torch.utils import cpp_extension

    for entry in directory.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.info("building the fused CPU attention kernel in %s (one-time)", directory)
    start = time.perf_counter()
    built = cpp_extension.load(
        name=name,
        sources=[str(source) for source in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        verbose=False,
        is_python_module=False,
    )
    if Path(built) != path:
        # cpp_extension appends _v<n> when one process builds the same name in a second folder (tests do)
        os.replace(built, path)
    logger.info("built the fused CPU attention kernel in %.1f s", time.perf_counter() - start)


def _write_record(record: Path, path: Path) -> None:
    """Record `path`'s sha256 beside it, atomically (a crash leaves the old record or none)."""
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(f"{_sha256(path)}  {path.name}\n")
    os.replace(tmp, record)


@functools.cache
def _load():
    """-> (module or None, the build error or None)."""
    try:
        return build(), None
    except Exception as e:  # a missing compiler surfaces as RuntimeError/OSError/CalledProcessError
        return None, e


def fused_kernel() -> Kernel | None:
    """The compiled kernel when the fused path is selected, else None (use the scratch path).

    ADAKV_CPU_ATTENTION: 'scratch' -> None; 'fused' -> the module or FusedKernelUnavailable;
    'auto' -> the module, or None with one warning when it cannot be built.
    """
    mode = envs.cpu_attention()
    if mode == "scratch":
        return None
    module, error = _load()
    if module is not None:
        return module
    if mode == "fused":
        raise FusedKernelUnavailable(
            "ADAKV_CPU_ATTENTION=fused but the fused CPU attention kernel cannot be built or loaded "
            f"({error!r}); it needs a C++ compiler (g++), ninja and a private cache folder; "
            "or set ADAKV_CPU_ATTENTION=scratch"
        ) from error
    _warn_fallback(error)
    return None


def load() -> Kernel | None:
    """The compiled library whatever ADAKV_CPU_ATTENTION says (it also holds non-attention kernels),
    or None, with one warning, when it cannot be built here."""
    module, error = _load()
    if module is None:
        _warn_torch_fallback(error)
    return module


@functools.cache
def _warn_fallback(error: Exception) -> None:
    logger.warning(
        "fused CPU attention unavailable (%r); decode reads every page through a bf16 scratch copy "
        "instead (several times slower at long contexts)",
        error,
    )


@functools.cache
def _warn_torch_fallback(error: Exception) -> None:
    logger.warning(
        "the compiled CPU library is unavailable (%r); sealing pages (~50x), decoding them for the "
        "scratch path and the per-token quantization-error feature (~80x) run in torch instead, "
        "which is slower",
        error,
    )
