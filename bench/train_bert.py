"""Train a small BERT from scratch with each attention variant on two real datasets, offline.

    python -m bench.train_bert            # the full comparison (`make train`), 6-30 min on 2 cores
    python -m bench.train_bert --quick    # a smoke run of a few steps

Standard attention is Hugging Face's own ``BertForSequenceClassification`` (SDPA); the other
variants are the same model after ``convert_bert(model, variant, init="random")``, built from the
same seed, so embeddings, feed-forward layers, data order and dropout streams start alike.
Datasets, split and tokenizer: ``bench/text_data.py``. Writes to ``bench/results/``:
``train_runs.csv`` (one row per run), ``train_curves.csv`` (loss per step), ``train_loss.png``
and ``train_table.md`` (also printed). With ``--warm-start`` it then converts the trained
standard model of seed 0 with ``init="pretrained"`` and reports, without fine-tuning, the warm
start's logit error per layer, hidden-state agreement and validation accuracy.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench import training

VARIANTS = ("standard", "shared", "symmetric", "pairwise_diag", "pairwise_full")


@dataclass
class Setup:
    """Model and schedule. 5 variants x 2 datasets x 3 seeds take ~6 min on 2 idle cores and up
    to ~30 min when other work takes most of them (per-step times vary 5x with the load)."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 8000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1
    steps: tuple = (("rotten_tomatoes", 200), ("bbc_news", 100))
    max_len: tuple = (("rotten_tomatoes", 64), ("bbc_news", 64))


def build_model(setup: Setup, vocab_size: int, num_labels: int, max_len: int, variant: str, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    from symattn_kernels.integrations.hf import convert_bert

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=setup.hidden_size, num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads, intermediate_size=setup.intermediate_size,
        max_position_embeddings=max_len, num_labels=num_labels, attn_implementation="sdpa",
    )
    model = BertForSequenceClassification(config)
    return model if variant == "standard" else convert_bert(model, variant, init="random")


def accuracy(model, ids, mask, targets) -> float:
    return training.accuracy(model, lambda i, m: model(input_ids=i, attention_mask=m).logits, ids, mask, targets)


def train_one(model, data, setup: Setup, steps: int, seed: int, progress) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.01)
    warmup = max(1, int(setup.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    losses, times = training.train_steps(
        model, data, setup.batch_size, steps, seed, optimizer,
        lambda i, m, t: model(input_ids=i, attention_mask=m, labels=t).loss, 1.0, progress, schedule)
    val_ids, val_mask, val_targets = data["val"]
    return {"losses": losses, "sec_per_step": statistics.median(times[min(5, steps - 1):]),
            "val_acc": accuracy(model, val_ids, val_mask, val_targets)}


def _parameters(model) -> tuple[int, int]:
    qkv = sum(p.numel() for layer in model.bert.encoder.layer for p in layer.attention.self.parameters())
    return sum(p.numel() for p in model.parameters()), qkv


def table(rows: list, seeds: int) -> str:
    lines = ["| dataset | variant | parameters | vs standard | Q/K/V params | ms / step | val. accuracy (mean ± std, "
             f"{seeds} seeds) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, variant, runs, accuracy_text, ms in training.summaries(rows, VARIANTS):
        base = next(r["params"] for r in rows if r["dataset"] == name and r["variant"] == "standard")
        change = 100 * (runs[0]["params"] - base) / base
        lines.append(f"| {name} | {variant} | {runs[0]['params']:,} | {change:+.2f} % "
                     f"| {runs[0]['qkv_params']:,} | {ms:.0f} | {accuracy_text} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for name, _ in curves))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant in VARIANTS:
            runs = curves.get((name, variant))
            if not runs:
                continue
            mean = torch.tensor(runs, dtype=torch.float64).mean(0)
            smooth, value = [], mean[0].item()
            for x in mean.tolist():  # exponential moving average, for legibility
                value = 0.9 * value + 0.1 * x
                smooth.append(value)
            ax.plot(smooth, label=variant)
        ax.set(title=f"{name}: training loss (mean of seeds, EMA 0.9)", xlabel="step", ylabel="cross-entropy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def warm_start_check(data: dict, setup: Setup, steps: int) -> str:
    """Train standard attention (seed 0), convert it with each warm start, evaluate without fine-tuning."""
    from symattn_kernels.integrations.hf import convert_bert, warm_start_report

    model = build_model(setup, data["vocab_size"], len(data["labels"]), data["max_len"], "standard", 0)
    with tqdm(total=steps, desc=f"{data['name']} warm-start source", leave=False) as progress:
        trained = train_one(model, data, setup, steps, 0, progress)
    val_ids, val_mask, val_targets = data["val"]
    sample = dict(zip(("input_ids", "attention_mask"), training.trimmed(val_ids[:64], val_mask[:64])))
    lines = [f"#### {data['name']}: warm start from the trained standard model (seed 0, "
             f"val. accuracy {100 * trained['val_acc']:.2f} %), no fine-tuning", "",
             "| variant | init | rel. logit error per layer | last hidden: rel. error / cosine | val. accuracy |",
             "|---|---|---|---|---:|"]
    for variant in VARIANTS[1:]:
        for init in ("pretrained", "random"):
            converted = convert_bert(copy.deepcopy(model), variant, init=init).eval()
            report = warm_start_report(model.eval(), converted, **sample)
            errors = ", ".join(f"{e:.2f}" for e in report.layer_logit_errors)
            acc = accuracy(converted, val_ids, val_mask, val_targets)
            agreement = f"{report.hidden_rel_error:.3f} / {report.hidden_cosine:.3f}"
            lines.append(f"| {variant} | {init} | {errors} | {agreement} | {100 * acc:.2f} |")
    return "\n".join(lines)


def _write(out: Path, rows: list, curves: dict) -> None:
    with open(out / "train_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "train_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "variant", "seed", "step", "loss"])
        for (name, variant), runs in curves.items():
            for seed, losses in enumerate(runs):
                writer.writerows((name, variant, seed, step, f"{loss:.5f}") for step, loss in enumerate(losses))
    plot(curves, out / "train_loss.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    training.add_run_arguments(parser, VARIANTS, quick_steps=8)
    parser.add_argument("--warm-start", action="store_true", help="also run the warm-start check")
    args = parser.parse_args(argv)
    setup = Setup()
    seeds, steps = training.schedule(args, setup.steps, quick_steps=8)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = {name: training.prepare(name, setup.vocab_size, dict(setup.max_len)[name]) for name in args.datasets}
    rows, curves = [], {}

    def run(name, variant, seed, progress):
        d = data[name]
        model = build_model(setup, d["vocab_size"], len(d["labels"]), d["max_len"], variant, seed)
        params, qkv = _parameters(model)
        result = train_one(model, d, setup, steps[name], seed, progress)
        curves.setdefault((name, variant), []).append(result.pop("losses"))
        rows.append({"dataset": name, "variant": variant, "seed": seed, "params": params, "qkv_params": qkv,
                     "steps": steps[name], **result, "final_loss": statistics.mean(curves[(name, variant)][-1][-20:])})

    done = training.seed_rounds(args, seeds, steps, run, lambda: _write(args.out, rows, curves))
    s = setup
    partial = "" if done == seeds else f" PARTIAL: {done} of {seeds} seeds (time limit)."
    report = [f"Small BERT from scratch: {s.layers} layers, d_model {s.hidden_size}, {s.heads} heads, FFN "
              f"{s.intermediate_size}, WordPiece vocab {s.vocab_size} trained on the training split; AdamW lr {s.lr}, "
              f"batch {s.batch_size}, steps {steps}, max length {dict(s.max_len)}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads. Wall time {time.perf_counter() - began:.0f} s.{partial}", "",
              table(rows, done)]
    if args.warm_start:
        report += [""] + [warm_start_check(data[name], setup, steps[name]) + "\n" for name in args.datasets]
    text = "\n".join(report)
    (args.out / "train_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
