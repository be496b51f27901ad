"""Distributed training: DDP and FSDP2 over converted BERT models, dropout seeding per rank, DDP
over ``torch.compile``, LAMA under DDP. The checks themselves (``tests/distributed_checks.py``)
run once in two torchrun processes on the gloo backend over loopback; each test here reads the
outcome of its check."""

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

from .distributed_checks import CHECKS, WORLD  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Two single-threaded ranks need about a minute on an idle 2-core machine; the bound leaves room
# for a loaded one and stops a hung collective.
TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "outcomes.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "tests.distributed_checks", str(out)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    # Own session, so that on timeout the launcher and both ranks go down together.
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        log, _ = launcher.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        log, _ = launcher.communicate()
        pytest.fail(f"the distributed checks did not finish within {TIMEOUT_S} s:\n{log[-4000:]}")
    assert launcher.returncode == 0 and out.exists(), f"torchrun exited with {launcher.returncode}:\n{log[-4000:]}"
    return json.loads(out.read_text())


def _assert_passed(outcomes, check):
    per_rank = outcomes[check]
    assert len(per_rank) == WORLD
    failed = {rank: o["detail"] for rank, o in per_rank.items() if not o["passed"]}
    assert not failed, f"{check}: " + "\n".join(f"{rank}: {detail}" for rank, detail in failed.items())


def test_every_check_ran(outcomes):
    assert list(outcomes) == CHECKS


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_equals_one_process_on_whole_batch(outcomes, variant):
    _assert_passed(outcomes, f"ddp-{variant}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_equals_one_process_and_shards(outcomes, variant):
    _assert_passed(outcomes, f"fsdp2-{variant}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_mask_follows_each_rank_seed(outcomes, variant):
    _assert_passed(outcomes, f"dropout-{variant}")


def test_ddp_over_torch_compile(outcomes):
    _assert_passed(outcomes, "ddp-compile")


def test_lama_classifier_ddp(outcomes):
    _assert_passed(outcomes, "lama-ddp")
