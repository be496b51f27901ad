"""Bad input raises TypeError/ValueError naming the argument, before any op runs."""

import subprocess
import sys

import pytest
import torch

import symattn_kernels as sk
from symattn_kernels import backends
from symattn_kernels.backends import registry


def q_(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


Q = q_(2, 5, 3, 8)

ATTENTION_CASES = [
    ("q-rank", dict(q=q_(5, 3, 8)), ValueError, r"q must have shape \[B, S, H, D\]"),
    ("q-int", dict(q=torch.ones(2, 5, 3, 8, dtype=torch.int32)), TypeError, "q must have dtype"),
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("head-dim-0", dict(q=q_(2, 5, 3, 0)), ValueError, "q has head dim 0"),
    ("head-dim-257", dict(q=q_(1, 2, 1, 257)), ValueError, "q has head dim 257"),
    ("v-rank", dict(v=q_(2, 5, 8)), ValueError, r"v must have shape \[B, S, H, Dv\]"),
    ("v-batch", dict(v=q_(3, 5, 3, 8)), ValueError, r"v must have shape \[B, S, H, Dv\] with"),
    ("v-seqlen", dict(v=q_(2, 4, 3, 8)), ValueError, "v must have shape"),
    ("v-heads", dict(v=q_(2, 5, 2, 8)), ValueError, "v must have shape"),
    ("v-dtype", dict(v=q_(2, 5, 3, 8, dtype=torch.float64)), TypeError, "v has dtype torch.float64 but q has"),
    ("v-int", dict(v=torch.ones(2, 5, 3, 8, dtype=torch.int64)), TypeError, "v must have dtype"),
    ("v-device", dict(v=q_(2, 5, 3, 8).to("meta")), ValueError, "v is on meta but q is on cpu"),
    ("coef-shape", dict(coef=q_(3, 4)), ValueError, r"coef must have shape \[H, D\] = \(3, 8\)"),
    ("coef-full-shape", dict(coef=q_(3, 8, 4)), ValueError, "coef must have shape"),
    ("coef-int", dict(coef=torch.ones(3, 8, dtype=torch.int32)), TypeError, "coef must be a floating-point"),
    ("coef-device", dict(coef=q_(3, 8).to("meta")), ValueError, "coef is on meta"),
    ("mask-shape", dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B, S\] = \(2, 5\)"),
    ("mask-dtype", dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
    ("mask-complex", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError,
     "key_padding_mask must be a bool tensor"),
    ("dropout-1", dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ("dropout-neg", dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale must be a finite float"),
    ("scale-huge-int", dict(scale=10**400), ValueError, "scale must be a finite float"),
    ("backend-unknown", dict(backend="cudnn"), ValueError, "backend must be one of 'auto'"),
]


@pytest.mark.parametrize("case,kwargs,exc,match", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_symmetric_attention_rejects(case, kwargs, exc, match):
    kwargs = dict(kwargs)
    q = kwargs.pop("q", Q)
    v = kwargs.pop("v", None)
    with pytest.raises(exc, match=match):
        sk.symmetric_attention(q, v, **kwargs)


def test_options_are_keyword_only_and_misspellings_fail():
    with pytest.raises(TypeError):
        sk.symmetric_attention(Q, None, None)
    with pytest.raises(TypeError):
        sk.shared_attention(Q, casual=True)


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_unavailable_backend_says_why_and_how(name, monkeypatch):
    status = backends.status(name)
    if status.usable and "cpu" in status.devices:
        pytest.skip(f"{name} is usable on CPU here")
    with pytest.raises(ValueError, match=f"backend='{name}'") as err:
        sk.shared_attention(Q, backend=name)
    message = str(err.value)
    assert status.reason in message or "runs on" in message
    if name == "cuda" and not status.usable:
        assert "pip install --no-build-isolation" in message


VARLEN_CASES = [
    ("q-rank", dict(q=q_(2, 5, 3, 8)), ValueError, r"q must have shape \[total, H, D\]"),
    ("cu-dtype", dict(cu=torch.tensor([0, 5], dtype=torch.int64)), TypeError, "cu_seqlens must have dtype int32"),
    ("cu-short", dict(cu=torch.tensor([0], dtype=torch.int32)), ValueError, "cu_seqlens must hold at least 2"),
    ("cu-end", dict(cu=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "cu_seqlens must rise from 0"),
    ("cu-decreasing", dict(cu=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError, "cu_seqlens must rise"),
    # int32 differences wrap to [2**31 - 1, 2**31 - 1, 7], all >= 0
    ("cu-wrapping", dict(cu=torch.tensor([0, 2**31 - 1, -2, 5], dtype=torch.int32), max_seqlen=2**31), ValueError,
     "cu_seqlens must rise"),
    ("max-seqlen", dict(max_seqlen=2), ValueError, "max_seqlen = 2 is below the longest sequence"),
    ("max-seqlen-type", dict(max_seqlen=0), ValueError, "max_seqlen must be a positive int"),
    ("max-seqlen-bool", dict(max_seqlen=True), ValueError, "max_seqlen must be a positive int"),
    ("v-total", dict(v=q_(4, 3, 8)), ValueError, r"v must have shape \[total, H, Dv\]"),
]


@pytest.mark.parametrize("case,kwargs,exc,match", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_rejects(case, kwargs, exc, match):
    q = kwargs.get("q", q_(5, 3, 8))
    cu = kwargs.get("cu", torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(exc, match=match):
        sk.symmetric_attention_varlen(q, kwargs.get("v"), cu, kwargs.get("max_seqlen", 5))


def test_vmap_over_cu_seqlens_is_refused_and_over_q_works():
    # The offsets' values lay out the call: torch's own .item() error inside vmap named none of this.
    q, cu = q_(9, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens is read by value .* cannot be vmapped"):
        torch.vmap(lambda c: sk.symmetric_attention_varlen(q, None, c, 9))(torch.stack([cu, cu]))
    qs = torch.randn(3, 9, 2, 8)
    got = torch.vmap(lambda x: sk.symmetric_attention_varlen(x, None, cu, 9))(qs)
    torch.testing.assert_close(got, torch.stack([sk.symmetric_attention_varlen(x, None, cu, 9) for x in qs]))


def lama_args(**override):
    args = dict(h=q_(2, 4, 6), context=q_(6), p=q_(6, 3), q=q_(6, 3))
    args.update(override)
    return args


LAMA_CASES = [
    ("h-rank", dict(h=q_(4, 6)), ValueError, r"h must have shape \[B, T, E\]"),
    ("h-int", dict(h=torch.ones(2, 4, 6, dtype=torch.int64)), TypeError, "h must have dtype"),
    ("context-dim", dict(context=q_(5)), ValueError, r"context must have shape \[E\] or \[B, E\]"),
    ("context-batch", dict(context=q_(3, 6)), ValueError, "context must have shape"),
    ("context-3d", dict(context=q_(2, 1, 6)), ValueError, r"context must have shape \[E\] or \[B, E\], got"),
    # h the odd one out: the message says the expected width came from h
    ("h-width", dict(h=q_(2, 4, 5)), ValueError,
     r"context must have shape \[E\] or \[B, E\] = \(5,\) \(sizes from h \(2, 4, 5\)\), got \(6,\)"),
    ("p-shape", dict(p=q_(5, 3)), ValueError, r"p must have shape \[E, m\] = \(6, 3\)"),
    ("q-heads", dict(q=q_(6, 2)), ValueError,
     r"q must have shape \[E, m\] = \(6, 3\) \(sizes from h \(2, 4, 6\) and p \(6, 3\)\)"),
    ("no-heads", dict(p=q_(6, 0), q=q_(6, 0)), ValueError, "p must have at least one head"),
    ("u-shape", dict(u=q_(2, 5, 6)), ValueError, r"u must have shape \[B, T, E\]"),
    ("p-dtype", dict(p=q_(6, 3, dtype=torch.float64)), TypeError, "p has dtype torch.float64 but h has"),
    ("mask-shape", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B, T\]"),
    ("mask-dtype", dict(key_padding_mask=torch.ones(2, 4)), TypeError, "key_padding_mask must be a bool tensor"),
    ("mask-complex", dict(key_padding_mask=torch.ones(2, 4, dtype=torch.complex64)), TypeError,
     "key_padding_mask must be a bool tensor"),
    ("head-norm", dict(head_norm="l1"), ValueError, "head_norm must be 'l2' or None"),
]


@pytest.mark.parametrize("case,override,exc,match", LAMA_CASES, ids=[c[0] for c in LAMA_CASES])
def test_lowrank_rejects(case, override, exc, match):
    args = lama_args(**override)
    with pytest.raises(exc, match=match):
        sk.lowrank_context_attention(args.pop("h"), args.pop("context"), args.pop("p"), args.pop("q"), **args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_key_padding_masks_read_as_nonzero(dtype):
    # A tokenizer's attention_mask: 1 = real token; any nonzero value counts as real, as in transformers.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 2, 1, 1, 0]], dtype=dtype)
    y = q_(2, 5, 3, 8)
    expected = sk.shared_attention(y, key_padding_mask=mask != 0, backend="torch")
    torch.testing.assert_close(sk.shared_attention(y, key_padding_mask=mask, backend="torch"), expected, rtol=0, atol=0)
    h, ctx, p, q = q_(2, 5, 6), q_(6), q_(6, 3), q_(6, 3)
    expected = sk.lowrank_context_attention(h, ctx, p, q, key_padding_mask=mask != 0, backend="torch")
    got = sk.lowrank_context_attention(h, ctx, p, q, key_padding_mask=mask, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("SYMATTN_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="environment variable SYMATTN_BACKEND must be one of .*'no-such-backend'"):
        sk.shared_attention(Q)
    monkeypatch.setenv("SYMATTN_BACKEND", "torch")
    assert backends.resolve("auto", Q.device, Q.dtype) == "torch"
    assert backends.resolve("torch", Q.device, Q.dtype) == "torch"
    # A backend the variable forces on inputs it cannot run: the error says where it came from.
    monkeypatch.setenv("SYMATTN_BACKEND", "cpu")
    with pytest.raises((TypeError, ValueError), match=r"backend='auto' read backend='cpu' from the environment variable"):
        sk.shared_attention(Q.double())


def test_auto_passes_the_fp16_only_cuda_kernels_by_for_fp32(monkeypatch):
    # Where the CUDA C++ kernels are built and Triton is not usable, auto sent fp32 CUDA calls to
    # them, and they raise TypeError on fp32 (they never down-cast), instead of going on to torch.
    usable = {"triton": False, "cuda": True, "torch": True, "cpu": False}
    monkeypatch.setattr(registry, "status",
                        lambda name: registry.BackendStatus(name, usable[name], "as on a GPU machine", ("cuda",)))
    gpu = torch.device("cuda")
    assert backends.resolve("auto", gpu, torch.float32) == "torch"
    for dtype in (torch.float16, torch.bfloat16):
        assert backends.resolve("auto", gpu, dtype) == "cuda"
    with pytest.raises(TypeError, match="backend='cuda' takes float16 or bfloat16 inputs, got torch.float32"):
        backends.resolve("cuda", gpu, torch.float32)


def test_auto_on_cpu_prefers_compiled_kernels_then_torch():
    expected = "cpu" if backends.status("cpu").usable else "torch"
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == expected
    assert backends.resolve("auto", torch.device("cpu"), torch.float64) == "torch"
    lowrank = backends.resolve("auto", torch.device("cpu"), torch.float32, op="lowrank")
    assert hasattr(backends.load(lowrank), "lowrank_forward")


def test_info_lists_every_backend_with_a_reason():
    report = sk.info()
    assert set(report["backends"]) == set(backends.BACKENDS)
    assert report["backends"]["torch"]["usable"]
    for entry in report["backends"].values():
        assert entry["reason"] and entry["devices"]
    assert report["versions"]["torch"] == torch.__version__


def test_info_command_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "symattn_kernels.info"], capture_output=True, text=True, check=True)
    for name in backends.BACKENDS:
        assert f"\n  {name} " in result.stdout
    assert "RuntimeWarning" not in result.stderr


def test_op_table_matches_the_backend_modules():
    for name in backends.BACKENDS:
        if not backends.status(name).usable:
            continue
        module = backends.load(name)
        for op in ("attention", "lowrank"):
            implemented = hasattr(module, f"{op}_forward") and hasattr(module, f"{op}_backward")
            assert implemented == (op in registry._OPS[name]), (name, op)
