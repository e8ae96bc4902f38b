"""The `adakv` command line. Subcommands import vLLM only when they need it.

adakv model path [MODEL]     print a local folder vLLM can serve (converts the embedded model once)
adakv demo [--model M]       greedy generations from vLLM plus the KV record size per precision
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adakv", description="Adaptive mixed-precision KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    path = model_sub.add_parser("path", help="print a local folder for MODEL (default: the embedded one)")
    path.add_argument("model", nargs="?", default=None, help=f"hub id or folder (default: {DEFAULT_MODEL})")
    path.set_defaults(func=_cmd_model_path)

    demo = sub.add_parser("demo", help="generate with vLLM on the embedded model and show KV sizes")
    demo.add_argument("--model", default=None, help=f"hub id or folder (default: embedded {DEFAULT_MODEL})")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--max-model-len", type=int, default=2048)
    demo.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="on CPU, the fraction of the NUMA node's memory vLLM may reserve (vLLM's own flag)",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
