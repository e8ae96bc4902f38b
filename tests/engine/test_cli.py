"""`adakv serve` / `adakv bench`: how vllm_argv rewrites the command line for vLLM (no engine)."""

from __future__ import annotations

import pytest

from adakv_vllm.engine.cli import vllm_argv

PLUGIN = ["--kv-cache-plugin", "adakv"]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the real bf16 weights: never the embedded model


@pytest.fixture
def yaml_config(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
        return str(path)

    return write


# (adakv argv, vLLM argv); E = the embedded model's folder
CASES = [
    # serve: the plugin on, the embedded model as the positional when none is named
    (["serve"], ["serve", "E", *PLUGIN]),
    (["serve", "--port", "8000"], ["serve", "E", "--port", "8000", *PLUGIN]),
    (["serve", "smollm2", "--port", "8000"], ["serve", "E", "--port", "8000", *PLUGIN]),
    (["serve", "default"], ["serve", "E", *PLUGIN]),
    (["serve", HUB_ID], ["serve", HUB_ID, *PLUGIN]),
    (["serve", "--model", "/m"], ["serve", "--model", "/m", *PLUGIN]),
    (["serve", "--model=smollm2"], ["serve", "--model=E", *PLUGIN]),
    # an explicit plugin setting, in any spelling, is kept as it is
    (["serve", "--kv-cache-plugin", "none"], ["serve", "E", "--kv-cache-plugin", "none"]),
    (["serve", "--kv-cache-plugin=none"], ["serve", "E", "--kv-cache-plugin=none"]),
    (["serve", "--kv_cache_plugin", "none"], ["serve", "E", "--kv_cache_plugin", "none"]),
    # engine benchmarks: the plugin on, --model added only when none is named (both forms)
    (["bench", "throughput"], ["bench", "throughput", *PLUGIN, "--model", "E"]),
    (["bench", "throughput", "--model=/m"], ["bench", "throughput", "--model=/m", *PLUGIN]),
    (["bench", "throughput", "--model", "/m"], ["bench", "throughput", "--model", "/m", *PLUGIN]),
    (["bench", "latency", "--model", "smollm2"], ["bench", "latency", "--model", "E", *PLUGIN]),
    (["bench", "throughput", "--model=default"], ["bench", "throughput", "--model=E", *PLUGIN]),
    (["bench", "throughput", "--model", HUB_ID], ["bench", "throughput", "--model", HUB_ID, *PLUGIN]),
    # clients: no engine flag, and no model unless given (bench serve asks the server for it)
    (["bench", "serve", "--port", "8000"], ["bench", "serve", "--port", "8000"]),
    (["bench", "serve", "--model", "smollm2"], ["bench", "serve", "--model", "E"]),
    (["bench", "serve", "--model=/m"], ["bench", "serve", "--model=/m"]),
    (["bench", "sweep", "serve", "--serve-cmd", "x"], ["bench", "sweep", "serve", "--serve-cmd", "x"]),
    (["bench", "--help"], ["bench", "--help"]),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_vllm_argv(argv, expected, model_path):
    assert vllm_argv(argv) == [
        model_path if a == "E" else a.replace("=E", f"={model_path}") for a in expected
    ]


def test_config_naming_a_model_wins(yaml_config, model_path):
    cfg = yaml_config("model: /m\nport: 8000\n")
    assert vllm_argv(["serve", "--config", cfg]) == ["serve", "--config", cfg, *PLUGIN]
    assert vllm_argv(["serve", "--config=" + cfg]) == ["serve", "--config", cfg, *PLUGIN]
    assert vllm_argv(["bench", "throughput", "--config", cfg]) == [
        "bench",
        "throughput",
        "--config",
        cfg,
        *PLUGIN,
    ]
    # a config without a model still gets the embedded one
    other = yaml_config("port: 8000\n")
    assert vllm_argv(["serve", "--config", other]) == ["serve", model_path, "--config", other, *PLUGIN]


@pytest.mark.parametrize("key", ["kv-cache-plugin", "kv_cache_plugin"])
def test_config_setting_the_plugin_wins(key, yaml_config, model_path):
    cfg = yaml_config(f"{key}: none\n")
    assert vllm_argv(["serve", "--config", cfg]) == ["serve", model_path, "--config", cfg]


def test_unreadable_config_is_left_to_vllm(tmp_path, model_path):
    missing = str(tmp_path / "missing.yaml")
    assert vllm_argv(["serve", "--config", missing]) == ["serve", model_path, "--config", missing, *PLUGIN]


# ---- the rewritten arguments through vLLM's own parsers ------------------------------------------
@pytest.fixture(scope="module")
def parse():
    """parse(vllm argv) -> Namespace, through the parsers `vllm serve` / `vllm bench X` use."""
    pytest.importorskip("vllm")
    import adakv_vllm

    adakv_vllm.register()  # --kv-cache-plugin on EngineArgs
    import vllm.entrypoints.cli.serve
    from vllm.benchmarks import latency, serve, throughput
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser()
    for cmd in vllm.entrypoints.cli.serve.cmd_init():
        cmd.subparser_init(top.add_subparsers())
    bench = {}
    for name, module in [("latency", latency), ("serve", serve), ("throughput", throughput)]:
        bench[name] = FlexibleArgumentParser()
        module.add_cli_args(bench[name])

    def run(argv: list[str]):
        return top.parse_args(argv) if argv[0] == "serve" else bench[argv[1]].parse_args(argv[2:])

    return run


def test_vllm_reads_the_model_it_was_given(parse, yaml_config, model_path):
    args = parse(vllm_argv(["bench", "throughput", "--model=/m"]))
    assert args.model == "/m" and args.kv_cache_plugin == "adakv"
    args = parse(vllm_argv(["bench", "latency"]))
    assert args.model == model_path and args.kv_cache_plugin == "adakv"
    args = parse(vllm_argv(["serve", "--config", yaml_config("model: /m\n")]))
    assert args.model_tag is None and args.model == "/m" and args.kv_cache_plugin == "adakv"
    args = parse(vllm_argv(["serve", "--kv-cache-plugin", "none"]))
    assert args.model_tag == model_path and args.kv_cache_plugin == "none"


def test_bench_serve_accepts_its_arguments(parse):
    """bench serve is a client: an engine flag would be 'unrecognized arguments'."""
    args = parse(vllm_argv(["bench", "serve", "--model", "smollm2", "--port", "8000"]))
    assert args.port == 8000 and args.model.endswith("SmolLM2-135M-Instruct-v1")
    assert parse(vllm_argv(["bench", "serve"])).model is None  # vLLM asks the server for its model
