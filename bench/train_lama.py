"""Compare pooling heads on one BiGRU text classifier, on two real datasets, offline.

    python -m bench.train_lama            # the full comparison (`make train-lama`), <= 30 min on 2 cores
    python -m bench.train_lama --quick    # a smoke run of a few steps, 1 seed

Every variant is ``LAMAClassifier`` (embeddings -> BiGRU -> pooling -> MLP) built from the same
seed, so embeddings, GRU, data order and dropout streams start alike; only the pooling differs:

* ``lama``: low-rank multi-head context attention (Mehta et al. 2019), token MLP for the keys,
  learned context, l2 head norm, token softmax (the ``symattn_kernels.lama`` defaults);
* ``additive``: single-head additive attention, ``softmax_t(v^T tanh(W h_t + b))`` (Bahdanau /
  Yang et al. 2016 style);
* ``structured``: Lin et al. (2017) structured self-attention, ``A = softmax_t(W2 tanh(W1 H^T))``
  with the same number of heads as LAMA and its penalty ``||A A^T - I||_F^2`` (coefficient
  ``--penalty``);
* ``mean``: masked mean pooling (no attention parameters).

Datasets, split and tokenizer: ``bench/text_data.py`` (Rotten Tomatoes fresh/rotten, BBC News
topics). Writes to ``bench/results/``: ``lama_runs.csv`` (one row per run: validation accuracy,
pooling-stage parameter count, median seconds per training step), ``lama_accuracy.png`` and
``lama_table.md`` (also printed).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench import training
from symattn_kernels.lama import LAMAClassifier, masked_mean

VARIANTS = ("lama", "additive", "structured", "mean")


@dataclass
class Setup:
    """Model and schedule: 4 variants x 2 datasets x 3 seeds, sized for <= 30 min on 2 cores."""

    embed_dim: int = 64
    hidden_size: int = 64  # per GRU direction: token states are 128 wide
    heads: int = 4  # LAMA and structured self-attention
    attention_size: int = 64  # hidden size of the additive / structured scorers
    vocab_size: int = 8000
    batch_size: int = 32
    lr: float = 2e-3
    steps: tuple = (("rotten_tomatoes", 300), ("bbc_news", 150))
    max_len: tuple = (("rotten_tomatoes", 64), ("bbc_news", 128))


class AdditivePooling(nn.Module):
    """Single-head additive attention: weights softmax_t(v^T tanh(W h_t + b)) over real tokens."""

    num_heads = 1

    def __init__(self, input_size: int, attention_size: int):
        super().__init__()
        self.proj = nn.Linear(input_size, attention_size)
        self.score = nn.Linear(attention_size, 1, bias=False)

    def forward(self, h, key_padding_mask=None):
        scores = self.score(torch.tanh(self.proj(h))).transpose(1, 2)  # [B, 1, T]
        return _masked_softmax_pool(scores, h, key_padding_mask)


class StructuredSelfAttention(nn.Module):
    """Lin et al. (2017): A = softmax_t(W2 tanh(W1 H^T)) [B, r, T], pooled = A H; ``penalty`` is
    the mean over the batch of ||A A^T - I||_F^2 from the last call."""

    def __init__(self, input_size: int, attention_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.w1 = nn.Linear(input_size, attention_size, bias=False)
        self.w2 = nn.Linear(attention_size, num_heads, bias=False)
        self.penalty = None

    def forward(self, h, key_padding_mask=None):
        scores = self.w2(torch.tanh(self.w1(h))).transpose(1, 2)  # [B, r, T]
        pooled, attn = _masked_softmax_pool(scores, h, key_padding_mask)
        eye = torch.eye(self.num_heads, dtype=attn.dtype, device=attn.device)
        self.penalty = (attn @ attn.transpose(1, 2) - eye).square().sum((1, 2)).mean()
        return pooled, attn


class MeanPooling(nn.Module):
    num_heads = 1

    def forward(self, h, key_padding_mask=None):
        weights = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        if key_padding_mask is not None:
            weights = weights * key_padding_mask
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        return masked_mean(h, key_padding_mask)[:, None], weights[:, None]


def _masked_softmax_pool(scores, h, key_padding_mask):
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None], float("-inf"))
    attn = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return attn @ h, attn


def build_model(setup: Setup, vocab_size: int, num_labels: int, variant: str, seed: int) -> LAMAClassifier:
    torch.manual_seed(seed)
    states = 2 * setup.hidden_size
    pooler = {
        "lama": lambda: None,
        "additive": lambda: AdditivePooling(states, setup.attention_size),
        "structured": lambda: StructuredSelfAttention(states, setup.attention_size, setup.heads),
        "mean": MeanPooling,
    }[variant]()
    return LAMAClassifier(vocab_size, setup.embed_dim, setup.hidden_size, setup.heads, num_labels,
                          pooler=pooler, dropout=0.2)


def train_one(model, data, setup: Setup, steps: int, seed: int, penalty: float, progress) -> dict:
    def loss_of(i, m, t):
        loss = nn.functional.cross_entropy(model(i, m), t)
        extra = getattr(model.attention, "penalty", None)
        return loss + penalty * extra if extra is not None and penalty else loss

    optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
    losses, times = training.train_steps(model, data, setup.batch_size, steps, seed, optimizer, loss_of, 5.0, progress)
    return {"sec_per_step": statistics.median(times[min(5, steps - 1):]), "final_loss": statistics.mean(losses[-20:]),
            "val_acc": training.accuracy(model, model, *data["val"])}


def table(rows: list, seeds: int) -> str:
    lines = [f"| dataset | pooling | heads | pooling params | model params | ms / step | val. accuracy (mean ± std, "
             f"{seeds} seeds) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, variant, runs, accuracy_text, ms in training.summaries(rows, VARIANTS):
        lines.append(f"| {name} | {variant} | {runs[0]['heads']} | {runs[0]['attention_params']:,} "
                     f"| {runs[0]['params']:,} | {ms:.0f} | {accuracy_text} |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        variants = [v for v in VARIANTS if any(r["dataset"] == name and r["variant"] == v for r in rows)]
        accs = [[100 * r["val_acc"] for r in rows if r["dataset"] == name and r["variant"] == v] for v in variants]
        means = [statistics.mean(a) for a in accs]
        stds = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        ax.bar(variants, means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C7"][: len(variants)])
        low = min(m - s for m, s in zip(means, stds))
        ax.set(title=f"{name}: validation accuracy", ylabel="%", ylim=(max(0.0, low - 5), 100))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    training.add_run_arguments(parser, VARIANTS, quick_steps=10)
    parser.add_argument("--penalty", type=float, default=0.1, help="structured self-attention penalty coefficient")
    args = parser.parse_args(argv)
    setup = Setup()
    seeds, steps = training.schedule(args, setup.steps, quick_steps=10)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data = {name: training.prepare(name, setup.vocab_size, dict(setup.max_len)[name]) for name in args.datasets}
    rows = []

    def run(name, variant, seed, progress):
        d = data[name]
        model = build_model(setup, d["vocab_size"], len(d["labels"]), variant, seed)
        result = train_one(model, d, setup, steps[name], seed, args.penalty, progress)
        rows.append({"dataset": name, "variant": variant, "seed": seed, "heads": model.attention.num_heads,
                     "attention_params": model.attention_parameters(),
                     "params": sum(p.numel() for p in model.parameters()), "steps": steps[name], **result})

    done = training.seed_rounds(args, seeds, steps, run, lambda: _write(args.out, rows))
    s = setup
    partial = "" if done == seeds else f" PARTIAL: {done} of {seeds} seeds (time limit)."
    smoke = " SMOKE RUN (--quick): not a result." if args.quick else ""
    text = "\n".join([
        f"BiGRU classifier: embeddings {s.embed_dim}, GRU {s.hidden_size} per direction, {s.heads} heads "
        f"(LAMA, structured), scorer size {s.attention_size}, WordPiece vocab {s.vocab_size} trained on the "
        f"training split; Adam lr {s.lr}, batch {s.batch_size}, steps {steps}, max length {dict(s.max_len)}, "
        f"structured penalty {args.penalty}; pooling params include LAMA's token MLP; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Wall time {time.perf_counter() - began:.0f} s.{partial}{smoke}", "",
        table(rows, done)])
    (args.out / "lama_table.md").write_text(text + "\n")
    print(text)


def _write(out: Path, rows: list) -> None:
    with open(out / "lama_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "lama_accuracy.png")


if __name__ == "__main__":
    main()
