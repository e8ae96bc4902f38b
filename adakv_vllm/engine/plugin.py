"""Wiring AdaKV into vLLM 0.32: the CUSTOM backend slot, the platform hooks and the CLI flag.

`install()` runs from `register()` in every vLLM process. It patches three things, each once:
  - `Platform.check_and_update_config`: when AdaKV is asked for, validate the options and the
    engine settings, then select our scheduler and worker classes (by dotted path, so they survive
    the spawn into EngineCore and workers) and a 32-token block;
  - `Platform.get_attn_backend_cls`: the CPU platform ignores `--attention-backend`, so return our
    backend for decoder attention when AdaKV is active;
  - `EngineArgs.add_cli_args` / `from_cli_args`: `--kv-cache-plugin adakv|none` is folded into
    `additional_config`, which reaches the scheduler and the workers; an explicit "none" keeps
    ADAKV_KV_CACHE_PLUGIN in the environment from switching the plugin on.
"""

from __future__ import annotations

import functools
import logging

from adakv_vllm import config as adakv_config
from adakv_vllm.quant.format import STORAGE_DTYPES, check_head_size

logger = logging.getLogger("vllm.adakv")

BACKEND_PATH = "adakv_vllm.attention.backend.AdaKVAttentionBackend"
SCHEDULER_PATH = "adakv_vllm.engine.scheduler.AdaKVScheduler"
WORKER_PATH = "adakv_vllm.engine.worker.AdaKVWorker"
DEFAULT_BLOCK_SIZE = 32
_PATCHED = "_adakv_patched"


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform_cls = type(current_platform)
    if not getattr(platform_cls, _PATCHED, False):
        _patch_platform(platform_cls)
        setattr(platform_cls, _PATCHED, True)
    if not getattr(EngineArgs, _PATCHED, False):
        _patch_engine_args(EngineArgs)
        EngineArgs._adakv_patched = True


# ---- platform ------------------------------------------------------------------------------------
def _patch_platform(platform_cls) -> None:
    original_check = platform_cls.check_and_update_config.__func__
    original_backend = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original_check)
    def check_and_update_config(cls, vllm_config):
        cfg = adakv_config.from_vllm_config(vllm_config)
        if cfg is not None:
            _activate(cls, vllm_config)
            _check_controller(cfg, vllm_config)
        original_check(cls, vllm_config)
        if cfg is not None and not vllm_config.cache_config.user_specified_block_size:
            vllm_config.cache_config.block_size = DEFAULT_BLOCK_SIZE

    @functools.wraps(original_backend)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if (
            _active_here()
            and not attn_selector_config.use_mla
            and attn_selector_config.attn_type
            in (
                None,
                "decoder",
            )
        ):
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            return AttentionBackendEnum.CUSTOM.get_path()
        return original_backend(cls, selected_backend, attn_selector_config, *args, **kwargs)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _active_here() -> bool:
    from vllm.config import get_current_vllm_config

    try:
        return adakv_config.from_vllm_config(get_current_vllm_config()) is not None
    except Exception:  # no current config in this context: nothing asked for AdaKV here
        return False


def _activate(platform_cls, vllm_config) -> None:
    """Reject settings AdaKV cannot serve correctly, then select its scheduler and worker."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ValueError(
            f"AdaKV runs on the CPU platform only in this release (got {platform_cls.__name__}); "
            "the GPU kernels are not implemented yet"
        )
    cache = vllm_config.cache_config
    if cache.cache_dtype != "auto":
        raise ValueError(
            "AdaKV stores its own mixed-precision pages: kv_cache_dtype must be 'auto', "
            f"got {cache.cache_dtype!r}"
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("AdaKV does not support speculative decoding yet")
    if vllm_config.kv_transfer_config is not None:
        # A connector moves KV blocks behind the backend's back: it would skip staging and sealing.
        raise ValueError("AdaKV does not support KV connectors (--kv-transfer-config) yet")
    model = vllm_config.model_config
    if model is not None:
        if model.dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"AdaKV caches the model's 16-bit K/V: --dtype must be bfloat16 or float16, got {model.dtype}"
            )
        check_head_size(model.get_head_size())
        if model.use_mla:
            raise ValueError("AdaKV does not support MLA attention models")
        if model.get_sliding_window():
            # vLLM frees blocks that leave the window while the attention gather still walks them.
            raise ValueError("AdaKV does not support sliding-window attention models yet")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("AdaKV does not support pipeline parallelism (tensor parallelism works)")
    if vllm_config.scheduler_config.policy == "priority":
        # Priority scheduling can preempt a request scheduled earlier in the same step, after vLLM
        # already hashed its new blocks; AdaKV would release their staging before they seal.
        raise ValueError("AdaKV does not support --scheduling-policy priority yet")
    if parallel.worker_cls not in ("auto", WORKER_PATH):
        raise ValueError(f"AdaKV needs its own worker class but worker_cls is {parallel.worker_cls!r}")
    parallel.worker_cls = WORKER_PATH
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER_PATH):
        raise ValueError(f"AdaKV needs its own scheduler class but scheduler_cls is {sched.scheduler_cls!r}")
    sched.scheduler_cls = SCHEDULER_PATH


def _check_controller(cfg, vllm_config) -> None:
    """Resolve the policy and load the learned controller's weights now, so a missing, corrupt or
    mismatched file is a clear error at start instead of an EngineCore crash."""
    from adakv_vllm.controller.policy import policy_for

    model = vllm_config.model_config
    if model is None:
        return
    policy_for(cfg, model.get_vocab_size(), cfg.group_size_for(model.get_head_size()))


# ---- CLI -----------------------------------------------------------------------------------------
def _patch_engine_args(engine_args_cls) -> None:
    original_add = engine_args_cls.add_cli_args
    original_from = engine_args_cls.from_cli_args.__func__

    @functools.wraps(original_add)
    def add_cli_args(parser):
        parser = original_add(parser)
        if not any("--kv-cache-plugin" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--kv-cache-plugin",
                choices=list(adakv_config.PLUGIN_VALUES),
                default=None,
                help="Store the KV cache with per-token mixed precision (adakv-vllm); 'none' = stock "
                "vLLM, even with ADAKV_KV_CACHE_PLUGIN set. Options go in "
                '--additional-config, e.g. \'{"target_bits": 4, "policy": "rule"}\'.',
            )
        return parser

    @functools.wraps(original_from)
    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        plugin = getattr(args, "kv_cache_plugin", None)
        if plugin is not None:
            extra = dict(engine_args.additional_config or {})
            extra[adakv_config.PLUGIN_KEY] = plugin
            engine_args.additional_config = extra
        return engine_args

    engine_args_cls.add_cli_args = staticmethod(add_cli_args)
    engine_args_cls.from_cli_args = classmethod(from_cli_args)
