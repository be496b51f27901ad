"""Public functions: defaults, validation, backend choice, docstrings; then one custom op."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, masks, ops, validation
from .ops import unit_last_stride as _unit_last_stride

HEAD_NORMS = ("l2", None)  # lowrank_context_attention's head_norm options


def _dropout_seed(dropout_p: float) -> Optional[Tensor]:
    # Drawn from torch's default CPU generator, so torch.manual_seed fixes the mask.
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _needs_grad(*tensors) -> bool:
    """Whether autograd will ask this call for gradients (backends route on it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _attention(q, v, cu_seqlens, max_seqlen, coef, scale, causal, key_padding_mask, dropout_p, exclude_self,
               return_lse, deterministic, backend):
    """Shared tail of the padded and varlen entry points, after their shape checks."""
    validation.coef(coef, q.shape[-2], q.shape[-1], q)
    scale = validation.options(scale, dropout_p, q.shape[-1], q.dtype)
    for name, value in (("causal", causal), ("exclude_self", exclude_self), ("return_lse", return_lse),
                        ("deterministic", deterministic)):
        validation.flag(name, value)
    validation.reverse_mode_only("symmetric_attention / shared_attention", q, v, coef)
    case = backends.AttentionCase(q.shape[-1], (q if v is None else v).shape[-1], _needs_grad(q, v, coef))
    name = backends.resolve(backend, q.device, q.dtype, case=case)
    # max_seqlen is the padded S, a SymInt under torch.export: int() would fix the exported
    # sequence axis to the example's length.
    out, lse, _ = ops.attention_fwd(
        _unit_last_stride(q), _unit_last_stride(v), _unit_last_stride(coef), key_padding_mask, cu_seqlens,
        _dropout_seed(dropout_p), scale, causal, float(dropout_p), exclude_self, max_seqlen, deterministic, name,
    )
    return (out, lse) if return_lse else out


def symmetric_attention(
    q: Tensor,
    v: Optional[Tensor] = None,
    *,
    coef: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    return_lse: bool = False,
    deterministic: bool = True,
    backend: str = "auto",
):
    r"""Attention whose query and key are one projection ``q``: ``softmax(scale * (q M) q^T) v``.

    Per batch and head, with Y = q[b, :, h] and M the identity, ``diag(coef[h])`` or ``coef[h]``,
    the scores are ``scale * Y M Y^T``; keys not allowed by ``causal``, ``key_padding_mask`` or
    ``exclude_self`` get zero weight; probabilities are dropped out with ``dropout_p`` (a
    counter-based generator seeded from torch's default generator, so ``torch.manual_seed``
    reproduces the mask); the output is ``P V`` with ``V = v``, or ``V = q`` when ``v`` is None
    (shared-weight attention: one tensor is query, key and value). A query row with no allowed key
    returns 0, its lse is ``-inf`` and its gradients are 0. NaN in a real token propagates; on
    the torch and cpu backends a padded token never reaches real rows, whatever it holds. Second-order gradients
    (``create_graph=True``) need ``backend="torch"``; the kernel backends raise instead of
    returning a detached gradient. The allowed keys for S = 4, 1 = allowed::

        causal=True          exclude_self=True     causal=True, exclude_self=True
        1 0 0 0              0 1 1 1               1 0 0 0   <- only itself: kept
        1 1 0 0              1 0 1 1               1 0 0 0
        1 1 1 0              1 1 0 1               1 1 0 0
        1 1 1 1              1 1 1 0               1 1 1 0

    Args:
        q (torch.Tensor):
            The shared query/key projection of shape ``[B, S, H, D]``, float16, bfloat16, float32
            or float64 (float64 on the ``torch`` backend only). Any strides; the last must be 1 or
            the tensor is copied.
        v (torch.Tensor, Optional):
            Values of shape ``[B, S, H, Dv]``, same dtype and device as ``q``. ``None`` uses ``q``.
            Default: ``None``.
        coef (torch.Tensor, Optional):
            Pairwise coefficient: ``[H, D]`` (diagonal) or ``[H, D, D]`` (full, not symmetrised),
            of any floating dtype: it is applied in the accumulation dtype (fp32 for fp16 / bf16
            inputs) and its gradient keeps its own dtype. Default: ``None`` (identity).
        scale (float, Optional):
            Score scale. Default: ``D ** -0.5``.
        causal (bool):
            Query i sees keys j <= i. Default: ``False``.
        key_padding_mask (torch.Tensor, Optional):
            ``[B, S]`` bool, ``True`` = real token, or integer, nonzero = real token (Hugging
            Face's ``attention_mask``); float masks are refused (0/1 and additive read differently).
            Padded keys are never attended to; padded query rows are computed and can be ignored.
            Default: ``None``.
        attn_mask (torch.Tensor, Optional):
            SDPA's general mask, broadcastable to ``[B, H, S, S]``: bool (``True`` = may attend) or
            additive float (0 = may attend, ``-inf`` or a large negative value = blocked), combined
            with the masks above. It is read by value and honoured exactly when it is a key padding
            mask (optionally causal) or block-diagonal (packed sequences: one varlen call over
            their tokens, whose dropout masks are drawn by packed position), the same for every
            head (with ``key_padding_mask``, a packed pattern's padded rows give 0); any other
            pattern, and score biases, raise ``ValueError``. Default: ``None``.
        dropout_p (float):
            Dropout probability on the attention weights, in ``[0, 1)``. Pass 0 at evaluation.
            Default: ``0.0``.
        exclude_self (bool):
            A token attends to itself only when no other key is allowed. Default: ``False``.
        return_lse (bool):
            Also return the natural-log log-sum-exp of the scores. Default: ``False``.
        deterministic (bool):
            ``False`` allows faster backward paths with atomics (run-to-run bit drift).
            Default: ``True``.
        backend (str):
            ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``; ``"auto"`` (overridden
            by the ``SYMATTN_BACKEND`` environment variable) picks triton on CUDA and the C++
            kernels, else composite torch, on CPU. Default: ``"auto"``.

    Returns:
        out (torch.Tensor): ``[B, S, H, Dv]`` in the dtype of ``q``.
        lse (torch.Tensor): ``[B, H, S]`` float32 (float64 for float64 inputs); only with
        ``return_lse``.

    Examples::
        >>> B, S, H, D = 2, 128, 12, 64
        >>> y = torch.randn(B, S, H, D)
        >>> mask = torch.ones(B, S, dtype=torch.bool); mask[1, 100:] = False  # padded batch
        >>> out = symmetric_attention(y, key_padding_mask=mask)
        >>> cu_seqlens = torch.tensor([0, 128, 228], dtype=torch.int32)     # same, varlen
        >>> packed = torch.cat([y[0], y[1, :100]])
        >>> out_v = symmetric_attention_varlen(packed, None, cu_seqlens, max_seqlen=128)
    """
    validation.tensor("q", q, dims=("B", "S", "H", "D"))
    validation.head_dim("q", q.shape[-1])
    validation.values(v, q, tuple(q.shape[:-1]), ("B", "S", "H"))
    batch, seqlen = q.shape[:2]
    key_padding_mask = validation.token_mask("key_padding_mask", key_padding_mask, (batch, seqlen), "B, S", q)
    if attn_mask is not None:
        validation.flag("causal", causal)  # before the plan reads it
        plan = _attn_mask_plan(attn_mask, q, key_padding_mask, causal)
        return attend_planned(q, v, coef, plan, scale=scale, dropout_p=dropout_p, exclude_self=exclude_self,
                              return_lse=return_lse, deterministic=deterministic, backend=backend)
    return _attention(q, v, None, seqlen, coef, scale, causal, key_padding_mask, dropout_p, exclude_self,
                      return_lse, deterministic, backend)


def _attn_mask_plan(attn_mask, q: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> masks.MaskPlan:
    """attn_mask (with key_padding_mask and causal) as kernel arguments, or an error naming it."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    validation.same_device("attn_mask", attn_mask, "q", q)
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_mask requires grad, but it is read by value (which keys each row may attend) and "
                         "would get no gradient: learnable score biases are not supported; pass attn_mask.detach() "
                         "for a constant mask")
    validation.not_vmapped("attn_mask", attn_mask, "choose the kernels' arguments", "one mask, or call once per mask")
    batch, seqlen, heads = q.shape[:3]
    return masks.plan_attn_mask(attn_mask, (batch, heads, seqlen, seqlen), key_padding_mask, causal)


def attend_planned(q: Tensor, v: Optional[Tensor], coef: Optional[Tensor], plan: masks.MaskPlan, *,
                   scale: Optional[float] = None, dropout_p: float = 0.0, exclude_self: bool = False,
                   return_lse: bool = False, deterministic: bool = True, backend: str = "auto"):
    """Attention of ``q`` / ``v`` ``[B, S, H, *]`` under a ``MaskPlan``: one padded call, or one
    varlen call over the packed tokens whose outputs are scattered back (other tokens get 0 and
    lse ``-inf``)."""
    common = dict(coef=coef, scale=scale, causal=plan.causal, dropout_p=dropout_p, exclude_self=exclude_self,
                  return_lse=return_lse, deterministic=deterministic, backend=backend)
    if not plan.packed:
        return symmetric_attention(q, v, key_padding_mask=plan.key_padding_mask, **common)
    batch, seqlen, heads = q.shape[:3]
    values = q if v is None else v
    out = values.new_zeros(batch * seqlen, heads, values.shape[-1])
    lse = q.new_full((heads, batch * seqlen), float("-inf"), dtype=ops.accumulate_dtype(q.dtype))
    if plan.index.numel():
        def tokens(x):
            return x.reshape(batch * seqlen, heads, x.shape[-1])[plan.index]

        packed = symmetric_attention_varlen(tokens(q), None if v is None else tokens(v), plan.cu_seqlens,
                                            plan.max_seqlen, **common)
        packed_out, packed_lse = packed if return_lse else (packed, None)
        out = out.index_copy(0, plan.index, packed_out)
        if return_lse:
            lse = lse.index_copy(1, plan.index, packed_lse)
    out = out.view(batch, seqlen, heads, values.shape[-1])
    return (out, lse.view(heads, batch, seqlen).transpose(0, 1).contiguous()) if return_lse else out


def shared_attention(
    y: Tensor,
    *,
    coef: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    return_lse: bool = False,
    deterministic: bool = True,
    backend: str = "auto",
):
    """Shared-weight attention: same as ``symmetric_attention(y, None, ...)``, except that there is
    no ``v`` argument; ``y`` ``[B, S, H, D]`` serves as query, key and value."""
    return symmetric_attention(
        y, None, coef=coef, scale=scale, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        dropout_p=dropout_p, exclude_self=exclude_self, return_lse=return_lse, deterministic=deterministic, backend=backend,
    )


def symmetric_attention_varlen(
    q: Tensor,
    v: Optional[Tensor],
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    coef: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    exclude_self: bool = False,
    return_lse: bool = False,
    deterministic: bool = True,
    backend: str = "auto",
):
    """Same as ``symmetric_attention``, except that sequences are packed without padding.

    Args:
        q (torch.Tensor): ``[total, H, D]``; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
        v (torch.Tensor, Optional): ``[total, H, Dv]`` or ``None`` (values are ``q``).
        cu_seqlens (torch.Tensor): ``[B + 1]`` int32, non-decreasing, from 0 to ``total``.
        max_seqlen (int): an upper bound on ``cu_seqlens[b+1] - cu_seqlens[b]``; memory, time
            and the dropout mask follow the real lengths, however loose the bound.

    Offsets on the CPU are checked before any kernel runs (``ValueError``); under ``torch.compile``
    the check is part of the graph and fails when it runs (``RuntimeError``). Offsets on a GPU are
    not read back (that would synchronise).

    Other options as in ``symmetric_attention`` (there is no ``key_padding_mask``).

    Returns:
        out ``[total, H, Dv]``; with ``return_lse`` also lse ``[H, total]``.
    """
    validation.tensor("q", q, dims=("total", "H", "D"))
    validation.head_dim("q", q.shape[-1])
    validation.values(v, q, tuple(q.shape[:-1]), ("total", "H"))
    validation.tensor("cu_seqlens", cu_seqlens, dims=("B + 1",), dtypes=(torch.int32,))
    validation.same_device("cu_seqlens", cu_seqlens, "q", q)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets [0, ..., total], got {cu_seqlens.numel()}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():  # it may come from .item() in the graph: checked when it runs
        torch._check(max_seqlen >= 1, lambda: "max_seqlen must be a positive int")
    elif max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    validation.not_vmapped("cu_seqlens", cu_seqlens, "lay out the sequences",
                           "one cu_seqlens, or call once per cu_seqlens")
    if cu_seqlens.device.type == "cpu":  # checking values on CUDA would synchronise
        # int64: int32 differences could wrap past the checks. With the first offset prepended the
        # lengths hold a leading 0 and keep the offsets' size: an exported program's offsets of
        # dynamic size then serve one sequence too (diff alone gives n - 1 entries, and export
        # specialises that size against 1, refusing either one sequence or all others).
        offsets = cu_seqlens.to(torch.int64)
        lengths = offsets.diff(prepend=offsets[:1])
        if torch.compiler.is_compiling():
            # The values are not known while tracing: the compiled graph checks them when it runs.
            torch._assert_async((cu_seqlens[0] == 0) & (cu_seqlens[-1] == q.shape[0]) & (lengths >= 0).all()
                                & (lengths.max() <= max_seqlen),
                                "cu_seqlens must rise from 0 to total, with no sequence longer than max_seqlen")
        else:
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((lengths < 0).any()):
                raise ValueError(f"cu_seqlens must rise from 0 to total = {q.shape[0]}, got {cu_seqlens.tolist()}")
            if int(lengths.max()) > max_seqlen:
                raise ValueError(f"max_seqlen = {max_seqlen} is below the longest sequence ({int(lengths.max())})")
    # No sequence is longer than all tokens together: grids and buffers sized by the bound never
    # exceed the real work, however loose the bound.
    # Kernels index the offsets as a dense array (a strided view read as dense is garbage).
    return _attention(q, v, cu_seqlens.contiguous(), torch.sym_min(max_seqlen, q.shape[0]), coef, scale, causal,
                      None, dropout_p, exclude_self, return_lse, deterministic, backend)


def lowrank_context_attention(
    h: Tensor,
    context: Tensor,
    p: Tensor,
    q: Tensor,
    *,
    u: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    head_norm: Optional[str] = "l2",
    token_softmax: bool = True,
    backend: str = "auto",
):
    r"""Low-rank multi-head context attention pooling (LAMA, Mehta et al. 2019).

    Each of m heads weighs the tokens by ``f_t = normalize_over_heads(tanh((p^T c) * (q^T u_t)))``
    and pools ``h`` with those weights: ``pooled = attn @ h``. With ``token_softmax`` the weights
    of each head are a softmax over the real tokens; without it they are f itself, zero on padded
    tokens. A sequence with no real token pools to 0.

    Args:
        h (torch.Tensor): token states ``[B, T, E]`` (e.g. BiGRU outputs).
        context (torch.Tensor): global context vector ``[E]`` (shared) or ``[B, E]`` (per sequence,
            e.g. the masked mean of ``h``).
        p (torch.Tensor): context factor ``[E, m]``.
        q (torch.Tensor): token-key factor ``[E, m]``.
        u (torch.Tensor, Optional): token keys ``[B, T, E]`` (e.g. an MLP of ``h``).
            Default: ``None`` (``h`` itself).
        key_padding_mask (torch.Tensor, Optional): ``[B, T]`` bool, ``True`` = real token, or
            integer, nonzero = real token; float masks are refused. Default: ``None``.
        head_norm (str, Optional): ``"l2"`` normalises f over the heads, ``None`` does not.
            Default: ``"l2"``.
        token_softmax (bool): softmax over tokens per head. Default: ``True``.
        backend (str): as in ``symmetric_attention``. Default: ``"auto"``.

    Returns:
        pooled (torch.Tensor): ``[B, m, E]``.
        attn (torch.Tensor): ``[B, m, T]`` token weights per head.
    """
    validation.tensor("h", h, dims=("B", "T", "E"))
    batch, tokens, dim = h.shape
    if u is not None:
        validation.tensor("u", u, dims=("B", "T", "E"))
        validation.shape("u", u, h.shape, "B, T, E")
    per_sequence = isinstance(context, Tensor) and context.dim() == 2
    if isinstance(context, Tensor) and context.dim() not in (1, 2):
        raise ValueError(f"context must have shape [E] or [B, E], got {tuple(context.shape)}")
    validation.tensor("context", context, dims=("B", "E") if per_sequence else ("E",))
    from_h = f"h {tuple(h.shape)}"
    validation.shape("context", context, (dim,) if context.dim() == 1 else (batch, dim), "E] or [B, E", from_h)
    validation.tensor("p", p, dims=("E", "m"))
    validation.tensor("q", q, dims=("E", "m"))
    heads = p.shape[1]
    if heads == 0:
        raise ValueError("p must have at least one head: shape [E, m] with m >= 1, got m = 0")
    validation.shape("p", p, (dim, heads), "E, m", from_h)
    validation.shape("q", q, (dim, heads), "E, m", f"{from_h} and p {tuple(p.shape)}")
    for name, x in (("u", u), ("context", context), ("p", p), ("q", q)):
        validation.same_device(name, x, "h", h)
        if x is not None and x.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but h has {h.dtype}; they must match")
    key_padding_mask = validation.token_mask("key_padding_mask", key_padding_mask, (batch, tokens), "B, T", h)
    validation.choice("head_norm", head_norm, HEAD_NORMS)
    validation.flag("token_softmax", token_softmax)
    validation.reverse_mode_only("lowrank_context_attention", h, context, p, q, u)
    case = backends.LowrankCase(dim, heads, _needs_grad(h, context, p, q, u))
    name = backends.resolve(backend, h.device, h.dtype, op="lowrank", case=case)
    return ops.lowrank_fwd(
        _unit_last_stride(h), _unit_last_stride(context), _unit_last_stride(p), _unit_last_stride(q),
        _unit_last_stride(u), key_padding_mask, head_norm or "none", bool(token_softmax), 1e-12, name,
    )
