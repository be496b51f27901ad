"""What the two offline training comparisons share: arguments, data preparation, batching, the
timed training loop, validation accuracy and the seed-round loop with its time limit
(``bench/train_bert.py``, ``bench/train_lama.py``)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from bench import text_data

RESULTS = Path(__file__).resolve().parent / "results"


def add_run_arguments(parser: argparse.ArgumentParser, variants: tuple, quick_steps: int) -> None:
    """The options every comparison takes: seeds, datasets, variants, step scale, time limit, --quick."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=list(text_data.DATASETS), choices=list(text_data.DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every dataset's step count")
    parser.add_argument("--time-limit", type=float, default=30.0,
                        help="minutes; no new seed round starts when the last round's duration would overrun it")
    parser.add_argument("--quick", action="store_true", help=f"{quick_steps} steps per run, 1 seed: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)


def schedule(args: argparse.Namespace, dataset_steps: tuple, quick_steps: int) -> tuple[int, dict]:
    """(seeds, steps per dataset) after --quick and --steps-scale."""
    seeds = 1 if args.quick else args.seeds
    steps = {name: quick_steps if args.quick else max(1, round(n * args.steps_scale)) for name, n in dataset_steps}
    return seeds, steps


def prepare(name: str, vocab_size: int, max_len: int) -> dict:
    """Tokenizer trained on the training split, both splits encoded to ``max_len``."""
    dataset = text_data.DATASETS[name]()
    tokenizer = text_data.train_tokenizer(dataset.train_texts, vocab_size)
    out = {"name": name, "labels": dataset.labels, "vocab_size": tokenizer.get_vocab_size(), "max_len": max_len}
    for side, texts, targets in (("train", dataset.train_texts, dataset.train_targets),
                                 ("val", dataset.val_texts, dataset.val_targets)):
        ids, mask = text_data.encode(tokenizer, texts, max_len)
        out[side] = (ids, mask, torch.tensor(targets))
    return out


def trimmed(ids: torch.Tensor, mask: torch.Tensor):
    """Pad each batch only to its longest sequence: short reviews cost short attention."""
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def batches(lengths: torch.Tensor, batch_size: int, steps: int, seed: int) -> list:
    """``steps`` shuffled batches of similar lengths (sorted within pools of 50 batches), so that
    short texts are not padded to long ones; epochs follow each other until ``steps`` is reached."""
    generator = torch.Generator().manual_seed(seed)
    pool = 50 * batch_size
    out = []
    while len(out) < steps:
        order = torch.randperm(len(lengths), generator=generator)
        epoch = []
        for start in range(0, len(order) - batch_size + 1, pool):
            chunk = order[start : start + pool]
            chunk = chunk[lengths[chunk].argsort(stable=True)]
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        out += [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
    return out[:steps]


def train_steps(model, data: dict, batch_size: int, steps: int, seed: int, optimizer, loss_of: Callable,
                clip_norm: float, progress: tqdm, schedule=None) -> tuple[list, list]:
    """``steps`` training steps on ``data["train"]`` in ``batches``, each trimmed to its longest text:
    ``loss_of(ids, mask, targets)``, backward, gradient norm clipped to ``clip_norm``, the optimizer
    (and learning-rate schedule) step. Returns the losses and the seconds of each step."""
    ids, mask, targets = data["train"]
    losses, times = [], []
    model.train()
    for batch in batches(mask.sum(1), batch_size, steps, seed):
        i, m = trimmed(ids[batch], mask[batch])
        start = time.perf_counter()
        loss = loss_of(i, m, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, times


@torch.no_grad()
def accuracy(model, logits_of: Callable, ids, mask, targets, batch_size: int = 256) -> float:
    """Share of rows whose ``logits_of(ids, mask)`` argmax is the target, with ``model`` in eval
    mode, in trimmed batches of ``batch_size``."""
    model.eval()
    correct = 0
    for start in range(0, len(ids), batch_size):
        i, m = trimmed(ids[start : start + batch_size], mask[start : start + batch_size])
        correct += int((logits_of(i, m).argmax(-1) == targets[start : start + batch_size]).sum())
    return correct / len(ids)


def seed_rounds(args: argparse.Namespace, seeds: int, steps: dict,
                run: Callable[[str, str, int, tqdm], None], after_round: Callable[[], None]) -> int:
    """Run ``run(dataset, variant, seed, progress)`` for every dataset x variant, seed by seed, and
    ``after_round()`` after each seed; returns how many seed rounds ran. Seeds are outermost so
    that, should the time limit stop the run, every variant has the same seeds."""
    began, done = time.perf_counter(), 0
    jobs = [(n, v) for n in args.datasets for v in args.variants]
    total = sum(steps[name] for name in args.datasets) * len(args.variants) * seeds
    with tqdm(total=total, desc="training", unit="step") as progress:
        for seed in range(seeds):
            round_began = time.perf_counter()
            for name, variant in jobs:
                progress.set_description(f"seed {seed} {name} {variant}")
                run(name, variant, seed, progress)
            done += 1
            after_round()
            now = time.perf_counter()
            if seed + 1 < seeds and (now - began) + (now - round_began) > 60 * args.time_limit:
                tqdm.write(f"stopping after {done} of {seeds} seeds: another round would pass {args.time_limit} min")
                break
    return done


def summaries(rows: list, variants: tuple):
    """Per dataset and variant, in order: (dataset, variant, runs, "mean ± std" of validation
    accuracy in %, median ms per step) over the runs (seeds) of ``rows``."""
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for variant in variants:
            runs = [r for r in rows if r["dataset"] == name and r["variant"] == variant]
            if not runs:
                continue
            accs = [100 * r["val_acc"] for r in runs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ms = 1000 * statistics.median(r["sec_per_step"] for r in runs)
            yield name, variant, runs, f"{statistics.mean(accs):.2f} ± {std:.2f}", ms
