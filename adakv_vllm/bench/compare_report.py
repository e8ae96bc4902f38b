"""`adakv bench compare`'s report: each round's result -> named figures -> min / median over rounds,
ratios against bf16 (figures.py: x > 1 = better), the markdown tables and the PNG.

A figure's key names where it comes from in compare_engine.py's result:
    kv_tokens, peak_rss_mib, startup_s
    throughput.output_tok_s, throughput.total_tok_s
    decode.BxC.cold.ms_per_token | .wall_s | .ttft_ms      (and the same for .warm)
"""

from __future__ import annotations

from pathlib import Path

from adakv_vllm.bench.figures import HIGHER, LOWER, cell, ratios, summarize, x_cell

REFERENCE = "bf16"
DECODE_FIGURES = ("ms_per_token", "wall_s", "ttft_ms")
ENGINE_COLUMNS = (  # compare_engine.engine_settings keys, in the table's column order
    "block_size", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
    "enable_chunked_prefill", "enforce_eager", "compilation_mode",
)  # fmt: skip


def figure_values(result: dict | None) -> dict[str, float]:
    """One round's result -> {figure key: value} of the phases it completed."""
    if not result:
        return {}
    out = {}
    if result.get("kv_capacity_tokens") is not None:
        out["kv_tokens"] = result["kv_capacity_tokens"]
    for key in ("peak_rss_mib", "startup_s"):
        if result.get(key) is not None:
            out[key] = result[key]
    for key in ("output_tok_s", "total_tok_s") if result.get("throughput") else ():
        out[f"throughput.{key}"] = result["throughput"][key]
    for point, phases in (result.get("decode") or {}).items():
        for phase, figs in phases.items():
            for key in DECODE_FIGURES:
                out[f"decode.{point}.{phase}.{key}"] = figs[key]
    return out


def better(key: str) -> str:
    return HIGHER if key == "kv_tokens" or key.endswith("_tok_s") else LOWER


def summarize_runs(runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """{config: [round records]} -> {config: {figure: summary over the rounds that measured it}}."""
    out = {}
    for name, rounds in runs.items():
        values = [figure_values(r["result"]) for r in rounds]
        keys = dict.fromkeys(k for v in values for k in v)  # in phase order
        out[name] = {k: summarize([v.get(k) for v in values]) for k in keys}
    return out


def ratio_table(summary: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{config: {figure: {"median": x, "best": x}}} against bf16; empty when bf16 measured nothing."""
    ref = summary.get(REFERENCE)
    if not ref:
        return {}
    return {
        name: {k: r for k, s in figs.items() if (r := ratios(s, ref.get(k), better(k))) is not None}
        for name, figs in summary.items()
    }


def _name(name: str, rounds: list[dict]) -> str:
    failed = sum(1 for r in rounds if r["error"])
    return name if not failed else f"{name} (FAILED {failed}/{len(rounds)})"


def _engine(rounds: list[dict]) -> dict:
    return next((r["result"]["engine"] for r in rounds if r["result"] and "engine" in r["result"]), {})


def table(runs: dict[str, list[dict]], summary: dict, rat: dict, settings: dict) -> str:
    """The markdown report: settings, engines as configured, then one table per phase."""
    common = [f"VLLM_CPU_KVCACHE_SPACE={settings['kv_space_gib']} GiB", *settings["set_for_every_config"]]
    user = ", ".join(f"{k}={v}" for k, v in settings["engine_args"].items())
    attention = settings["adakv_cpu_attention"] or "(unset)"
    lines = [
        f"Model {settings['model']}. Every config at its own defaults (vLLM's for stock, the plugin's for "
        f"AdaKV); set by the benchmark for every config alike: {', '.join(common)}; "
        f"user engine args: {user or 'none'}. ADAKV_CPU_ATTENTION={attention}.",
        f"Figures: median (min) of {settings['repeats']} round(s), configs alternating order each round. "
        f"x = ratio against {REFERENCE}'s median, > 1 = better: more KV tokens or tokens/s, "
        "fewer ms, seconds or MiB.",
        "",
        "| config | block size | max_num_seqs | max_num_batched_tokens | prefix caching | chunked prefill "
        "| enforce_eager | compilation |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for name, rounds in runs.items():
        e = _engine(rounds)
        cells = [e.get(k, "-") for k in ENGINE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")

    def row(name: str, keys: list[tuple[str, str]]) -> str:
        figs, xs = summary.get(name, {}), rat.get(name, {})
        cells = [f"{cell(figs.get(k), spec)} | {x_cell(xs.get(k))}" for k, spec in keys]
        return f"| {_name(name, runs[name])} | " + " | ".join(cells) + " |"

    main = [("kv_tokens", ",.0f"), ("peak_rss_mib", ",.0f"), ("startup_s", ".0f")]
    header = "| config | KV tokens | x | peak RSS MiB | x | startup s | x"
    if settings["throughput"]:
        t = settings["throughput"]
        main += [("throughput.output_tok_s", ".1f"), ("throughput.total_tok_s", ".1f")]
        header += " | output tok/s | x | total tok/s | x"
        lines += [
            "",
            f"Throughput: {t['num_prompts']} random prompts x {t['input_len']} tokens in / "
            f"{t['output_len']} out (ignore_eos) in one generate call.",
        ]
    lines += ["", header + " |", "|---|" + "---:|" * (2 * len(main))]
    lines += [row(name, main) for name in runs]
    for batch, context in (settings["decode"] or {}).get("points", []):
        point = f"{batch}x{context}"
        keys = [
            (f"decode.{point}.{phase}.{k}", ".2f" if k == "wall_s" else ".1f")
            for phase in ("cold", "warm")
            for k in DECODE_FIGURES
        ]
        lines += [
            "",
            f"Decode {batch} x {context} tokens, {settings['decode']['tokens']} new tokens each (lower is "
            "better): ms/token and TTFT per request, averaged over the batch; wall = the whole generate "
            "call. cold = prompts never seen (prefill and sealing inside); warm = the same prompts again "
            "from the prefix cache.",
            "",
            "| config | cold ms/token | x | cold wall s | x | cold TTFT ms | x "
            "| warm ms/token | x | warm wall s | x | warm TTFT ms | x |",
            "|---|" + "---:|" * (2 * len(keys)),
        ]
        lines += [row(name, keys) for name in runs]
    return "\n".join(lines)


def plot(rat: dict[str, dict[str, dict]], path: Path) -> None:
    """Horizontal bars: each figure's x against bf16 (medians) per config; the line at 1 is bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rat if n != REFERENCE]
    keys = list(dict.fromkeys(k for n in names for k in rat[n] if k != "startup_s"))  # phase order
    fig, ax = plt.subplots(figsize=(9, 0.35 * max(len(keys), 1) * max(len(names), 1) + 1.5))
    height = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [(rat[name].get(k) or {}).get("median") or 0.0 for k in keys]
        ax.barh([j + i * height for j in range(len(keys))], xs, height=height, color=f"C{i}", label=name)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks([j + height * (len(names) - 1) / 2 for j in range(len(keys))])
    ax.set_yticklabels(keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"x against {REFERENCE} (median of rounds; > 1 = better)")
    ax.set_title("Each config at its own defaults, against stock bf16")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
