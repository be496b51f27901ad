"""What the Triton forward launcher hands to Triton, checked without a GPU: the launches are
recorded instead of run (the kernels themselves are tested under the interpreter and on CUDA)."""

import pytest
import torch

pytest.importorskip("triton")
from symattn_kernels.triton import attention_fwd  # noqa: E402


class _Recorder:
    """Stands in for a JIT or autotuned kernel: `kernel[grid](*args, **kwargs)` records kwargs."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.fixture
def recorded(monkeypatch):
    plain, autotuned = _Recorder(), _Recorder()
    monkeypatch.setattr(attention_fwd, "_symattn_fwd_kernel", plain)
    monkeypatch.setattr(attention_fwd, "_fwd_autotuned", autotuned)
    monkeypatch.setattr(attention_fwd, "is_interpret", lambda: False)
    monkeypatch.setattr(attention_fwd, "device_arch", lambda device: 90)
    return plain, autotuned


def _forward(shared: bool):
    q = torch.randn(2, 300, 4, 64)
    v = None if shared else torch.randn(2, 300, 4, 64)
    attention_fwd.attention_forward(q, v, None, None, None, None, 0.125, False, 0.0, False, None, True)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_forward_autotunes_by_default(recorded, monkeypatch, shared):
    monkeypatch.delenv("SYMATTN_TRITON_AUTOTUNE", raising=False)
    plain, autotuned = recorded
    _forward(shared)
    assert not plain.launches and len(autotuned.launches) == 1
    assert "BLOCK_M" not in autotuned.launches[0]  # the autotuner picks the blocks


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "v"])
def test_autotune_off_pins_the_first_shipped_config(recorded, monkeypatch, shared):
    monkeypatch.setenv("SYMATTN_TRITON_AUTOTUNE", "0")
    plain, autotuned = recorded
    _forward(shared)
    assert not autotuned.launches and len(plain.launches) == 1
    launch = plain.launches[0]
    expected = attention_fwd.fwd_configs_for(300, 64, 64, False, 0, shared)[0]
    assert (launch["BLOCK_M"], launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == expected
    assert launch["SHARED_V"] is shared


def test_sm90_symmetric_backward_with_dropout_waits_for_a_triton_that_keeps_it_in_registers(monkeypatch):
    from symattn_kernels.triton import attention_bwd

    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 6))
    assert attention_bwd.sym_bwd_config(64, 64, 90, dropout=True) is None
    assert not attention_bwd.use_symmetric_bwd(None, False, False, 64, 64, 90, dropout=True)
    assert attention_bwd.sym_bwd_config(64, 64, 90) == (64, 16, 8, 2)  # without dropout it fits
    assert attention_bwd.sym_bwd_config(64, 64, 80, dropout=True) == (32, 16, 8, 1)
    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 9))
    assert attention_bwd.sym_bwd_config(64, 64, 90, dropout=True) == (64, 16, 8, 1)  # one stage: no spill


def test_sm90_key_launch_splits_its_columns_earlier_before_triton_3_9(monkeypatch):
    from symattn_kernels.triton import attention_bwd

    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 6))
    assert attention_bwd.bwd_plan(64, 128, False, 2, True, 90)[2] == (1, 2)
    assert attention_bwd.bwd_plan(64, 64, False, 2, True, 90)[2] == (1, 1)
    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 9))
    assert attention_bwd.bwd_plan(64, 128, False, 0, True, 90)[2] == (1, 1)
    assert attention_bwd.bwd_plan(64, 128, False, 2, True, 90)[2] == (1, 2)  # a full M also loads Y_I M
    assert attention_bwd.bwd_plan(128, 128, False, 2, True, 90)[2] == (1, 2)


@pytest.mark.parametrize("lengths,varlen,grouped", [
    ((64,), False, True), ((63,), False, False), ((13, 27, 8), True, True), ((13, 27, 9), True, False),
], ids=["S64", "S63", "varlen-total-48", "varlen-total-49"])
def test_dropout_draws_one_philox_per_8_keys_only_on_a_key_stride_of_8(recorded, monkeypatch, lengths, varlen, grouped):
    """The key stride (S, or the total token count in varlen) decides: a multiple of 8 starts every
    row on a Philox counter; otherwise rows start inside one and the kernels draw per element."""
    monkeypatch.setenv("SYMATTN_TRITON_AUTOTUNE", "0")
    plain, _ = recorded
    if varlen:
        q = torch.randn(sum(lengths), 2, 32)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        attention_fwd.attention_forward(q, None, None, None, cu, 5, 0.125, True, 0.2, False, max(lengths), True)
    else:
        q = torch.randn(2, lengths[0], 2, 32)
        attention_fwd.attention_forward(q, None, None, None, None, 5, 0.125, True, 0.2, False, None, True)
    assert plain.launches[0]["DROPOUT_GROUPED"] is grouped
    attention_fwd.attention_forward(q, None, None, None, cu if varlen else None, None, 0.125, True, 0.0, False,
                                    max(lengths) if varlen else None, True)
    assert plain.launches[1]["DROPOUT_GROUPED"] is False  # no dropout: one variant


def test_sm80_wide_backward_draws_dropout_per_element_before_triton_3_9(monkeypatch):
    from symattn_kernels.triton import attention_bwd

    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 6))
    assert not attention_bwd.bwd_groups_dropout(256, 256, 80)  # the grouped draw spilled 8 bytes there
    assert attention_bwd.bwd_groups_dropout(128, 128, 80) and attention_bwd.bwd_groups_dropout(256, 256, 90)
    monkeypatch.setattr(attention_bwd, "TRITON_VERSION", (3, 9))
    assert attention_bwd.bwd_groups_dropout(256, 256, 80)
