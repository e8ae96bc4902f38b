"""Markdown tables with paired differences against bf16, and PNG plots of quality vs average bits."""

from __future__ import annotations

from pathlib import Path

from adakv_vllm.eval.configs import CONFIGS, REFERENCE
from adakv_vllm.eval.tasks import mean_se, paired


def _fmt(mean: float, se: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def _capacity(r: dict) -> dict:
    return r.get("capacity") or {"ratio": float("nan"), "bits_per_element": float("nan")}


ADAPTIVE = ("attention", "rule", "learned")


def _policy_differences(results: list[dict], mc: list[str]) -> list[str]:
    """Each adaptive policy against random routing and static at the same budget (the honest
    controls), and against the best uniform format of equal or higher capacity, paired on the same
    windows / examples."""
    by_name = {r["config"]: r for r in results}
    has_kl = all("wikitext" in r["results"] for r in results)
    uniform = [
        r for r in results if (CONFIGS.get(r["config"]) or CONFIGS["bf16"]).adakv is not None
        and CONFIGS[r["config"]].adakv["policy"] == "static"
    ]  # fmt: skip
    rows = []
    for r in results:
        name = r["config"]
        config = CONFIGS.get(name)
        if config is None or not config.adakv or config.adakv.get("policy") not in ADAPTIVE:
            continue
        controls = [
            c.name
            for c in CONFIGS.values()
            if c.adakv
            and c.nominal_bits == config.nominal_bits
            and c.adakv.get("key_value_split") == config.adakv.get("key_value_split")
            and c.adakv.get("policy") in ("random", "static", *ADAPTIVE)
            and c.name != name
            and c.name in by_name
        ]
        if "wikitext" in r["results"]:  # the best uniform format of >= capacity, by KL
            at_least = [u for u in uniform if _capacity(u)["ratio"] >= _capacity(r)["ratio"] - 1e-9]
            at_least = [u for u in at_least if "wikitext" in u["results"]]
            if at_least:
                best = min(at_least, key=lambda u: mean_se(u["results"]["wikitext"]["kl"])[0])["config"]
                if best not in controls:
                    controls.append(best)
        for control in controls:
            other = by_name[control]["results"]
            cells = []
            if has_kl:
                kl = paired(r["results"]["wikitext"]["kl"], other["wikitext"]["kl"])
                cells.append(_fmt(*kl, digits=4))
            cells += [
                _fmt(*paired(r["results"][t]["acc_norm"], other[t]["acc_norm"]), 100)
                for t in mc
                if t in other
            ]
            rows.append(f"| {name} − {control} | " + " | ".join(cells) + " |")
    columns = (["KL (nats/token)"] if has_kl else []) + [f"{t} Δ acc_norm" for t in mc]
    if not rows or not columns:  # nothing paired (e.g. a needle-only run)
        return []
    header = "| paired difference | " + " | ".join(columns) + " |"
    return [header, "|---|" + "---:|" * len(columns), *rows, ""]


def markdown(results: list[dict], settings: dict) -> str:
    by_name = {r["config"]: r for r in results}
    ref = by_name.get(REFERENCE)
    tasks = settings["tasks"]
    mc = [t for t in tasks if t not in ("wikitext", "needle")]
    scope = [f"Model `{Path(settings['model']).name}`"]
    if mc:
        scope.append(f"MC tasks: first {settings['limit']} examples")
    if "wikitext" in tasks:
        scope.append(
            f"WikiText-2: {settings['wikitext_limit']} windows of {settings['wikitext_window']} tokens, "
            "second half scored"
        )
    lines = [
        "; ".join(scope)
        + ". Values ± standard error; Δ = paired difference against bf16 on the same examples.",
        "",
    ]
    if "wikitext" in tasks:
        lines += [
            "The frontier: capacity = bf16 bytes per cached token / this config's bytes per cached "
            "token (scales, bit map and page padding included), bits/elem = 16 / capacity; code bits = "
            "the average precision the policy chose (keys and values).",
            "",
            "| config | capacity | bits/elem | code bits | PPL | NLL Δ vs bf16 | KL vs bf16 (nats/token) "
            "| quantized reads |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(results, key=lambda r: (_capacity(r)["ratio"], r["config"])):
            w = r["results"]["wikitext"]
            d = paired(w["nll"], ref["results"]["wikitext"]["nll"]) if ref else (float("nan"),) * 2
            kl, cap = mean_se(w["kl"]), _capacity(r)
            lines.append(
                f"| {r['config']} | {cap['ratio']:.2f}x | {cap['bits_per_element']:.2f} | "
                f"{r['avg_bits']:.2f} | {w['ppl']:.2f} | {_fmt(*d, digits=4)} | "
                f"{_fmt(*kl, digits=4)} | {100 * w['quantized_reads']:.0f}% |"
            )
        lines.append("")
    lines += _policy_differences(results, mc)
    if mc:
        header = "| config | avg bits | " + " | ".join(f"{t} acc / acc_norm (Δ acc_norm)" for t in mc) + " |"
        lines += [header, "|---|---:|" + "---:|" * len(mc)]
        for r in results:
            cells = []
            for t in mc:
                m = r["results"][t]
                acc, acc_n = mean_se(m["acc"]), mean_se(m["acc_norm"])
                d = paired(m["acc_norm"], ref["results"][t]["acc_norm"]) if ref else (float("nan"),) * 2
                cells.append(f"{_fmt(*acc, 100)} / {_fmt(*acc_n, 100)} ({_fmt(*d, 100)})")
            lines.append(f"| {r['config']} | {r['avg_bits']:.2f} | " + " | ".join(cells) + " |")
        n = {t: results[0]["results"][t]["n"] for t in mc}
        lines.append("")
        lines.append("n per task: " + ", ".join(f"{t} {n[t]}" for t in mc) + ".")
        adakv = [r for r in results if r["config"] not in (REFERENCE, "fp8")]
        if adakv:
            share = {t: adakv[0]["results"][t]["quantized_reads"] for t in mc}
            lines.append(
                f"Attention reads served from sealed pages ({adakv[0]['config']}): "
                + ", ".join(f"{t} {100 * f:.0f}%" for t, f in share.items())
                + "."
            )
        lines.append("")
    if "needle" in tasks:
        lines += ["| config | needle found (all lengths and depths) |", "|---|---:|"]
        for r in results:
            m = r["results"]["needle"]
            lines.append(f"| {r['config']} | {_fmt(*mean_se(m['found']), 100, 0)}% (n={m['n']}) |")
        lines.append("")
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if all("wikitext" in r["results"] for r in results):
        _frontier(results, out, plt)

    metrics = []
    if all("wikitext" in r["results"] for r in results):
        metrics.append(("wikitext", "KL vs bf16 (nats/token)", lambda m: mean_se(m["kl"])))
    for task in results[0]["results"]:
        if task not in ("wikitext", "needle"):
            metrics.append((task, f"{task} acc_norm", lambda m: mean_se(m["acc_norm"])))
    for task, label, fn in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            mean, se = fn(r["results"][task])
            ax.errorbar(r["avg_bits"], mean, yerr=se, fmt="o", capsize=3)
            ax.annotate(
                r["config"], (r["avg_bits"], mean), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        ax.set_xlabel("average bits per cached element")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=120)
        plt.close(fig)


def _frontier(results: list[dict], out: Path, plt) -> None:
    """KL against capacity, one series per policy (stock configs as their own series)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in results:
        config = CONFIGS.get(r["config"])
        policy = config.adakv["policy"] if config and config.adakv else "stock"
        series.setdefault(policy, []).append(r)
    for policy, rs in series.items():
        rs.sort(key=lambda r: _capacity(r)["ratio"])
        x = [_capacity(r)["ratio"] for r in rs]
        y, e = zip(*(mean_se(r["results"]["wikitext"]["kl"]) for r in rs), strict=True)
        ax.errorbar(x, y, yerr=e, fmt="o" if policy == "stock" else "o-", capsize=3, label=policy)
        for r, xi, yi in zip(rs, x, y, strict=True):
            ax.annotate(r["config"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("capacity: tokens per byte relative to bf16 (scales and bit map included)")
    ax.set_ylabel("KL vs bf16 (nats/token), WikiText-2")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
