"""Distributed training checks, run in two processes by ``tests/test_distributed.py``:

    torchrun --standalone --nproc-per-node 2 -m tests.distributed_checks OUT.json

(gloo, CPU). Every rank builds the same small converted BERT (or LAMA classifier) from the same
seed and trains on its half of each batch; the reference is one process training a copy on the
whole batch. Checks, each on the two CPU backends of the attention ops (``-cpu``, ``-torch``):

* ``ddp-<variant>-<backend>``, ``fsdp2-<variant>-<backend>``: DistributedDataParallel and FSDP2 ``fully_shard``
  match the reference (gradients of the first step, parameters after a few SGD steps), no
  padding, no dropout. FSDP2 must also really shard the attention parameters, and its
  ``state_dict()`` must save and load through torch.distributed.checkpoint.
* ``dropout-<variant>-<backend>``: attention dropout on; each rank's loss is reproduced bit for bit by
  one process seeded like that rank, and the averaged gradients by the mean of those replays;
  another rank's seed gives another mask.
* ``lama-ddp-<backend>``: ``LAMAClassifier`` (padded batches) under DDP matches the reference.
* ``ddp-compile-cpu``: DDP over ``torch.compile(model)`` (``pairwise_full``) matches the eager
  reference.

Process start-up dominates the time, so all checks share one process group. Each check runs the
same collectives on every rank and compares only at its end, so a failing check leaves the
others running; rank 0 writes ``{check: {"rank r": {"passed", "detail", "seconds"}}}`` to OUT.json (``passed`` is None
when the backend is not usable here).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import BertConfig, BertForSequenceClassification

from symattn_kernels import backends
from symattn_kernels.integrations import hf
from symattn_kernels.lama import LAMAClassifier

from .attention_checks import describe_mismatch

WORLD = 2
PER_RANK, SEQLEN, STEPS, VOCAB, CLASSES = 2, 12, 3, 64, 3
# Peaked attention (initializer_range 0.15), so a wrong attention gradient shows.
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=SEQLEN, num_labels=CLASSES, initializer_range=0.15, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
# fp32 rounding: the halves of a batch and the whole batch go through differently blocked matmuls,
# and DDP divides each rank's gradient before summing. Observed: up to 1.4e-6 eager, 2e-6 compiled.
REL_TOL = 2e-5
# One rank's gradient alone must be far off the whole batch's, or the comparison proves nothing.
CONTROL_MIN = 1e-2
DROPOUT_SEED = 1000

# The two CPU backends of the attention ops: the fused C++ kernels and the PyTorch composite.
BACKENDS = ("cpu", "torch")
CHECKS = ([f"{kind}-{v}-{b}" for b in BACKENDS for v in hf.VARIANTS for kind in ("ddp", "fsdp2", "dropout")]
          + [f"lama-ddp-{b}" for b in BACKENDS] + ["ddp-compile-cpu"])


def bert(variant: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**BERT, **overrides}, attn_implementation="sdpa"))
    return hf.convert_bert(model, variant, init="random").train()


def bert_batches() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = WORLD * PER_RANK
    return [dict(input_ids=torch.randint(1, VOCAB, (rows, SEQLEN), generator=gen),
                 labels=torch.randint(0, CLASSES, (rows,), generator=gen)) for _ in range(STEPS)]


def bert_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def lama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LAMAClassifier(VOCAB, 16, 16, num_heads=4, num_classes=CLASSES, dropout=0.0).train()


def lama_batches() -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    rows = WORLD * PER_RANK
    batches = []
    for _ in range(STEPS):
        lengths = torch.randint(2, SEQLEN + 1, (rows,), generator=gen)
        mask = (torch.arange(SEQLEN)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, VOCAB, (rows, SEQLEN), generator=gen) * mask
        labels = torch.randint(0, CLASSES, (rows,), generator=gen)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return batches


def lama_loss(model, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def shard(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model, params_of, loss_fn, batches: list[dict]) -> tuple[dict, dict]:
    """SGD with momentum over ``batches``: (gradients of the first step, parameters at the end),
    as whole tensors keyed by the names of ``params_of`` (the unwrapped model)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first_grads = None
    for batch in batches:
        loss_fn(model, batch).backward()
        if first_grads is None:
            first_grads = {n: full(p.grad) for n, p in params_of.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return first_grads, {n: full(p) for n, p in params_of.named_parameters()}


def relative_errors(actual: dict, expected: dict) -> dict:
    """Per tensor, max |actual - expected| / max |expected|."""
    assert actual.keys() == expected.keys(), f"parameter names differ: {sorted(actual.keys() ^ expected.keys())}"
    return {n: ((actual[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-30)).item()
            for n in expected}


def assert_matches(actual: dict, expected: dict, what: str) -> float:
    """Raise unless every tensor is within ``REL_TOL``; return the largest relative error."""
    errors = relative_errors(actual, expected)
    bad = {n: e for n, e in errors.items() if not e <= REL_TOL}
    if bad:
        name = max(bad, key=bad.get)
        diff = (actual[name] - expected[name]).abs()
        where = describe_mismatch(actual[name], expected[name], diff > REL_TOL * expected[name].abs().max())
        raise AssertionError(f"{what}: {len(bad)} tensors beyond relative error {REL_TOL}; worst {name} "
                             f"{bad[name]:.3g}: {where}")
    return max(errors.values())


def check_equal_to_one_process(model, wrap, loss_fn, batches, rank: int) -> str:
    """``wrap(copy of model)`` trained on this rank's halves == a copy trained on whole batches."""
    ref, local, alone = (copy.deepcopy(model) for _ in range(3))
    ref_grads, ref_params = train(ref, ref, loss_fn, batches)
    grads, params = train(wrap(local), local, loss_fn, [shard(b, rank) for b in batches])
    own_grads, _ = train(alone, alone, loss_fn, [shard(batches[0], rank)])
    control = max(relative_errors(own_grads, ref_grads).values())
    assert control > CONTROL_MIN, f"one rank's gradient is within {control:.3g} of the whole batch's: no test"
    grad_error = assert_matches(grads, ref_grads, "gradients of the first step")
    param_error = assert_matches(params, ref_params, f"parameters after {len(batches)} steps")
    return f"relative error: gradients {grad_error:.2g}, parameters {param_error:.2g}; one rank alone {control:.2g}"


def fsdp2(model, mesh):
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def check_fsdp2(variant: str, rank: int, mesh) -> str:
    model = bert(variant)
    sharded = {}

    def wrap(local):
        fsdp2(local, mesh)
        sharded.update((n, p) for n, p in local.named_parameters() if n.startswith("bert.encoder.layer.0.attention"))
        return local

    detail = check_equal_to_one_process(model, wrap, bert_loss, bert_batches(), rank)
    for name, p in sharded.items():
        ok = isinstance(p, DTensor) and p.placements == (Shard(0),) and p.to_local().shape[0] < p.shape[0]
        assert ok, f"{name} is not sharded over dim 0 across the ranks"
    return f"{detail}; {len(sharded)} attention parameters of layer 0 sharded; {check_fsdp2_checkpoint(variant, mesh)}"


def check_fsdp2_checkpoint(variant: str, mesh) -> str:
    """A sharded converted model's ``state_dict()`` (it raised: the standard-projection hook asked
    a DTensor for its storage) holds what the unsharded model's does, and a torch.distributed.checkpoint
    save / load of it into another sharded model gives back every parameter."""
    plain = bert(variant)
    expected = {n: t.detach().clone() for n, t in plain.state_dict().items()}
    state = fsdp2(plain, mesh).state_dict()
    assert_matches({n: full(t) for n, t in state.items()}, expected, "sharded state_dict vs unsharded")
    path = [tempfile.mkdtemp(prefix="symattn-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save(state, checkpoint_id=path[0])
    other = bert(variant)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # every parameter must come from the checkpoint
    fsdp2(other, mesh)
    loaded = other.state_dict()
    dcp.load(loaded, checkpoint_id=path[0])
    other.load_state_dict(loaded)
    original = {n: full(p) for n, p in plain.named_parameters()}
    assert_matches({n: full(p) for n, p in other.named_parameters()}, original, "parameters after a DCP round trip")
    return "state_dict and DCP round trip match"


def check_dropout(variant: str, rank: int) -> str:
    """Each rank's attention dropout mask follows torch.manual_seed on that rank alone."""
    model = bert(variant, attention_probs_dropout_prob=0.3)
    batch = shard(bert_batches()[0], rank)

    def step(module, params_of, seed):
        torch.manual_seed(seed)
        loss = bert_loss(module, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in params_of.named_parameters()}

    local = copy.deepcopy(model)
    loss, grads = step(DDP(local), local, DROPOUT_SEED + rank)
    replay = copy.deepcopy(model)
    replay_loss, replay_grads = step(replay, replay, DROPOUT_SEED + rank)
    for g in replay_grads.values():
        dist.all_reduce(g)
        g /= WORLD
    other = copy.deepcopy(model)
    other_loss, _ = step(other, other, DROPOUT_SEED + (1 - rank))
    assert torch.equal(loss, replay_loss), f"rank {rank}: loss {loss.item()} != its seed's replay {replay_loss.item()}"
    assert not torch.equal(loss, other_loss), f"rank {rank}: the other rank's seed gives the same loss: mask unused?"
    error = assert_matches(grads, replay_grads, "DDP gradients vs the mean of per-rank replays")
    return f"loss equal to its replay; gradients vs mean of replays: relative error {error:.2g}"


@contextlib.contextmanager
def backend(name: str):
    """``backend="auto"`` (the modules' choice) resolves to ``name`` inside the block."""
    previous = os.environ.get("SYMATTN_BACKEND")
    os.environ["SYMATTN_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("SYMATTN_BACKEND") if previous is None else os.environ.update(SYMATTN_BACKEND=previous)


def all_checks(rank: int) -> dict:
    """{name: (backend, check)} in the order of ``CHECKS``."""
    mesh = init_device_mesh("cpu", (WORLD,))
    checks = {}
    for name in BACKENDS:
        for v in hf.VARIANTS:
            checks[f"ddp-{v}-{name}"] = name, lambda v=v: check_equal_to_one_process(
                bert(v), DDP, bert_loss, bert_batches(), rank)
            checks[f"fsdp2-{v}-{name}"] = name, lambda v=v: check_fsdp2(v, rank, mesh)
            checks[f"dropout-{v}-{name}"] = name, lambda v=v: check_dropout(v, rank)
    for name in BACKENDS:
        checks[f"lama-ddp-{name}"] = name, lambda: check_equal_to_one_process(
            lama(), DDP, lama_loss, lama_batches(), rank)
    checks["ddp-compile-cpu"] = "cpu", lambda: check_equal_to_one_process(
        bert("pairwise_full"), lambda m: DDP(torch.compile(m)), bert_loss, bert_batches(), rank)
    return checks


def run_checks(rank: int) -> dict:
    checks = all_checks(rank)
    assert list(checks) == CHECKS
    outcomes = {}
    for name, (backend_name, check) in checks.items():
        began = time.perf_counter()
        print(f"rank {rank}: {name}", file=sys.stderr, flush=True)
        available = backends.status(backend_name)
        if not available.usable:  # the same answer on every rank: no collective is left waiting
            outcomes[name] = dict(passed=None, detail=f"backend {backend_name!r} is not usable: {available.reason}")
            continue
        try:
            with backend(backend_name):
                outcomes[name] = dict(passed=True, detail=check())
        except Exception as error:  # noqa: BLE001 - recorded per check, reported by the test
            trace = traceback.format_exc(limit=-3)
            outcomes[name] = dict(passed=False, detail=f"{type(error).__name__}: {error}\n{trace}")
        outcomes[name]["seconds"] = round(time.perf_counter() - began, 2)
    return outcomes


def main(out_path: str) -> None:
    # A crash of either rank (SIGABRT, SIGSEGV) prints every thread's Python stack into the log
    # that the test shows, and the progress lines below say which check was running.
    faulthandler.enable()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    if dist.get_world_size() != WORLD:
        raise SystemExit(f"run with --nproc-per-node {WORLD}, not {dist.get_world_size()}")
    outcomes = run_checks(rank)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, outcomes)
    if rank == 0:
        merged = {n: {f"rank {r}": o[n] for r, o in enumerate(gathered)} for n in CHECKS}
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    dist.destroy_process_group()
    print(f"rank {rank}: outcomes gathered, process group destroyed", file=sys.stderr, flush=True)
    # Leave without interpreter finalization. One CI run lost rank 0 to SIGABRT ("terminate called
    # without an active exception", no Python error); C++ threads torn down during finalization are
    # a known source of such aborts (pytorch/pytorch#179291). Every outcome is on disk by now.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
