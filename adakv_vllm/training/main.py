"""`adakv train-controller`: label tokens of several texts, fit the MLP, write weights + model card.

    adakv train-controller --ablation --out DIR          # the full run: default sizes + ablations
    adakv train-controller --windows 8 --window 64 --epochs 50 --out DIR    # a small run

then serve with `controller_weights=DIR/smollm2-135m.safetensors` (and `policy="learned"`).

Stages, each resumable: (1) sensitivity labels in shards of windows under --work (a finished shard
is never recomputed; delete it to redo), (2) fit with a fixed seed, (3) evaluate on held-out windows
of every source (classification metrics and the planner's regret against random / rule / attention /
oracle allocations), optional feature ablations, (4) `<name>.safetensors` + `<name>.card.json` in
--out. No controller is shipped with the package: the weights are only valid for the quantizer
(quant/levels.QUANTIZER_ID) and group size they were labelled with, both recorded in their metadata.

Text (training/sources.py): WikiText-2 minus every window the evaluation suite scores at its usual
settings, BoolQ passages and HellaSwag contexts from the second halves of their validation files;
`adakv eval` refuses to score WikiText windows or MC examples recorded in the card of the weights it
evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from adakv_vllm.quant.levels import QUANTIZER_ID
from adakv_vllm.training import fit as fitting
from adakv_vllm.training.forward import BLOCK_SIZE
from adakv_vllm.training.labels import LABEL_BITS, LabelSettings

NAME = "smollm2-135m"
HEAD_SIZE = 64
DEFAULT_SOURCES = ("wikitext", "boolq", "hellaswag")
FEATURE_GROUPS = {
    "qerr": ("log_qerr2", "log_qerr3", "log_qerr4", "log_qerr8"),
    "position": ("log_position",),
    "rarity": ("rarity", "seq_freq", "token_rank"),
    "distribution": ("entropy", "confidence", "has_dist"),
    "attention": ("attention", "has_attention"),
}
RAW_KEYS = ("token_ids", "prior_count", "qerr", "entropy", "prob", "attention")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="adakv train-controller", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out", type=Path, default=Path("controller-out"), help="weights + card go here")
    ap.add_argument("--work", type=Path, default=None, help="label shards (default: OUT/labels)")
    ap.add_argument(
        "--windows",
        type=int,
        default=336,
        help="text windows in all, shared evenly over --sources (the last 20%% of each held out)",
    )
    ap.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help="comma-separated training texts (training/sources.py): wikitext, boolq, hellaswag",
    )
    ap.add_argument("--shard", type=int, default=32, help="windows labelled per batch / shard file")
    ap.add_argument("--window", type=int, default=LabelSettings.window, help="labelled positions per window")
    ap.add_argument(
        "--horizon", type=int, default=LabelSettings.horizon, help="predictions summed into a label"
    )
    ap.add_argument(
        "--position-stride",
        type=int,
        default=LabelSettings.position_stride,
        help="label every n-th position (and all of the first 16)",
    )
    ap.add_argument(
        "--group-size",
        type=int,
        default=LabelSettings.group_size,
        help="quantization group of the labels and features: the serving engine's must match",
    )
    ap.add_argument("--epochs", type=int, default=FitSettings().epochs)
    ap.add_argument("--label-bits", type=float, default=FitSettings().label_bits)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablation", action="store_true", help="also fit without each feature group")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap.parse_args(argv)


FitSettings = fitting.FitSettings


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adakv_vllm import model_store
    from adakv_vllm.training import sources as texts
    from adakv_vllm.training.forward import LlamaProbe
    from adakv_vllm.training.labels import label_batch, training_starts

    model_path = model_store.resolve_model(args.model)
    settings = LabelSettings(
        window=args.window,
        horizon=args.horizon,
        position_stride=args.position_stride,
        group_size=args.group_size,
    )
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    length = settings.window + settings.horizon
    plan = []  # (source, its window starts)
    try:  # bad --sources / --windows: a clear message before any labelling
        counts = texts.split_windows(args.windows, names)
        for source in texts.load(names, tokenizer):
            starts = training_starts(len(source.ids), length, counts[source.name], source.exclude)
            plan.append((source, starts))
            log(f"{source.name}: {len(starts)} windows of {length} tokens from {len(source.ids)} tokens")
    except ValueError as e:
        raise SystemExit(f"adakv train-controller: {e}") from None
    work = args.work or args.out / "labels"
    work.mkdir(parents=True, exist_ok=True)
    log(f"labels in {work}")

    probe = None
    shards = {}  # source name -> its shards
    for source, starts in plan:
        shards[source.name] = []
        for k in range(0, len(starts), args.shard):
            chunk = starts[k : k + args.shard]
            batch = torch.tensor([source.ids[a : a + length] for a in chunk])
            path = work / f"labels-{shard_key(model_path, settings, chunk, source.name, batch)}.safetensors"
            if not path.exists():
                if probe is None:
                    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
                    probe = LlamaProbe(model)
                log(f"labelling {source.name} windows {k}..{k + len(chunk) - 1}")
                result = label_batch(probe, batch, settings)
                result["starts"] = torch.tensor(chunk)
                _save_atomic(result, path)
            shards[source.name].append(_load(path))
    vocab_size = len(tokenizer)

    train_rows, val_rows, val_blocks = _flatten(shards)
    cost = fitting.record_bytes(HEAD_SIZE, settings.group_size)
    fit_settings = FitSettings(epochs=args.epochs, label_bits=args.label_bits, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    num_train = train_rows["token_ids"].shape[0]
    drop_dist = torch.rand(num_train, generator=gen) < fit_settings.missing_dist_fraction
    drop_attention = torch.rand(num_train, generator=gen) < fit_settings.missing_attention_fraction
    x_train = fitting.build_features(train_rows, vocab_size, drop_dist, drop_attention)
    s_train = fitting.full_sensitivity(train_rows["sensitivity"])
    s_val = fitting.full_sensitivity(val_rows["sensitivity"])
    x_val_prompt = fitting.build_features(val_rows, vocab_size, torch.ones(len(s_val), dtype=torch.bool))
    x_val_full = fitting.build_features(val_rows, vocab_size)
    for b in val_blocks:  # as prompt tokens are served: no sampling distribution known
        b["x"] = fitting.build_features(b, vocab_size, torch.ones(b["s"].shape[0], dtype=torch.bool))
    blocks_with_dist = [{**b, "x": fitting.build_features(b, vocab_size)} for b in val_blocks]

    log(f"fitting on {len(s_train)} labelled tokens, validating on {len(s_val)}")
    with tqdm(total=fit_settings.epochs, desc="fit", unit="epoch") as bar:
        model, info = fitting.fit(
            x_train,
            s_train,
            cost,
            fit_settings,
            progress=lambda e, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.4f}"),
        )
    metrics = {
        "validation_prompt_tokens": fitting.classification_metrics(
            model, x_val_prompt, s_val, cost, args.label_bits
        ),
        "validation_with_distribution": fitting.classification_metrics(
            model, x_val_full, s_val, cost, args.label_bits
        ),
        "regret_nats": {
            str(bits): fitting.allocation_regret(
                val_blocks, model, cost, bits, HEAD_SIZE, settings.group_size
            )
            for bits in (2.5, 3.0, 3.5, 4.0)
        },
        "regret_nats_by_source": {
            name: {
                str(bits): fitting.allocation_regret(
                    [b for b in val_blocks if b["source"] == name],
                    model,
                    cost,
                    bits,
                    HEAD_SIZE,
                    settings.group_size,
                )
                for bits in (3.0, 3.5)
            }
            for name in shards
        },
        "regret_nats_with_distribution": {
            str(bits): fitting.allocation_regret(
                blocks_with_dist, model, cost, bits, HEAD_SIZE, settings.group_size
            )
            for bits in (3.0, 4.0)
        },
    }
    log(json.dumps(metrics, indent=1))
    ablation = None
    if args.ablation:
        ablation = _ablation(x_train, s_train, cost, fit_settings, val_blocks, settings)

    from adakv_vllm.controller import model as controller_model
    from adakv_vllm.controller.features import FEATURE_NAMES
    from adakv_vllm.controller.policy import controller_expectations

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        **controller_expectations(settings.group_size),
        "model": Path(model_path).name,
        "vocab_size": str(vocab_size),
    }
    weights = args.out / f"{NAME}.safetensors"
    controller_model.save(model, weights, meta)
    card = {
        "weights": weights.name,
        "model": Path(model_path).name,
        "data": {
            "sources": [
                {
                    "name": source.name,
                    "text": source.description,
                    "windows": len(starts),
                    "held_out_windows": _holdout(len(starts)),
                    "examples": source.examples,
                }
                for source, starts in plan
            ],
            "tokenization": "documents joined by a blank line, no special tokens",
            "excluded_eval_settings": texts.EVAL_SETTINGS,
            # what `adakv eval` refuses to score (eval/configs.py)
            "training_spans": [[a, a + length] for s, st in plan if s.name == "wikitext" for a in st],
            "mc_examples": {s.name: s.examples for s, _ in plan if s.examples},
            "num_windows": sum(len(st) for _, st in plan),
            "labelled_tokens": {"train": len(s_train), "validation": len(s_val)},
        },
        "labels": {
            **dataclasses.asdict(settings),
            "bits": LABEL_BITS,
            "quantizer": QUANTIZER_ID,
            "block_size": BLOCK_SIZE,
            "procedure": "training/labels.py",
        },
        "features": list(FEATURE_NAMES),
        "fit": {**dataclasses.asdict(fit_settings), **info},
        "metrics": metrics,
        "ablation": ablation,
        "seconds": round(time.time() - started, 1),
        "versions": {"torch": torch.__version__},
    }
    (args.out / f"{NAME}.card.json").write_text(json.dumps(card, indent=1) + "\n")
    log(f"wrote {weights} and its card in {time.time() - started:.0f} s")
    return 0


def _ablation(x_train, s_train, cost, fit_settings, val_blocks, settings) -> dict:
    from adakv_vllm.controller.features import FEATURE_NAMES

    results = {}
    for group, names in {"none": (), **FEATURE_GROUPS}.items():
        mask = torch.tensor([n not in names for n in FEATURE_NAMES])
        model, _ = fitting.fit(x_train, s_train, cost, fit_settings, mask=mask)
        blocks = [{**b, "x": torch.where(mask, b["x"], 0.0)} for b in val_blocks]
        results[f"without_{group}"] = {
            str(bits): fitting.allocation_regret(blocks, model, cost, bits, HEAD_SIZE, settings.group_size)
            for bits in (3.0, 3.5)
        }
        log(f"ablation without {group}: {results[f'without_{group}']}")
    return results


def _holdout(num_windows: int) -> int:
    return max(1, num_windows // 5)


def _flatten(shards: dict[str, list[dict]]):
    """Per-token rows of labelled positions, split by window: the last fifth of every source's
    windows held out (and also cut into the blocks the engine would seal)."""
    train, val = [], []
    for name, source_shards in shards.items():
        windows = []
        for shard in source_shards:
            pos = shard["positions"]
            for w in range(shard["starts"].numel()):
                row = {k: shard[k][w, pos] for k in RAW_KEYS}
                row["positions"] = pos
                row["sensitivity"] = shard["sensitivity"][w]
                windows.append(row)
        cut = len(windows) - _holdout(len(windows))
        train += windows[:cut]
        val += [(name, row) for row in windows[cut:]]

    def cat(rows):
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    blocks = []
    for name, row in val:
        block_of = row["positions"] // BLOCK_SIZE  # the blocks the engine would seal
        for b in block_of.unique():
            sel = block_of == b
            block = {k: v[sel] for k, v in row.items()}
            block["s"] = fitting.full_sensitivity(block["sensitivity"])
            block["source"] = name
            blocks.append(block)
    return cat(train), cat([row for _, row in val]), blocks


def _save_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.rename(path)


def shard_key(
    model_path: str,
    settings: LabelSettings,
    starts: list[int],
    source: str = "wikitext",
    tokens: torch.Tensor | None = None,
) -> str:
    """What a label shard depends on: the model (its folder and config), the quantizer (its id
    names the codebooks, rotation and clip search), every label setting (the group size included)
    and the windows it labels (their source, starts and tokens). A rerun with any of them changed
    labels anew instead of reusing stale shards."""
    config = Path(model_path) / "config.json"
    parts = [
        QUANTIZER_ID,
        str(Path(model_path).resolve()) if config.is_file() else model_path,
        config.read_text() if config.is_file() else "",
        json.dumps(dataclasses.asdict(settings), sort_keys=True),
        json.dumps(starts),
        source,
        "" if tokens is None else hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def log(msg: str) -> None:
    print(f"[train-controller] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
