"""What a Hugging Face style attention mask asks for, in the terms the kernels take.

The kernels take a key padding mask, a causal flag and packed sequences (``cu_seqlens``). A mask
that a model or a user hands to a module is reduced to exactly those, or refused:

* ``[B, S]``: bool or integer (nonzero = real token, the tokenizer's ``attention_mask``), or
  float: 0/1 values as the integer form, or additive (0 = real, ``-inf`` or a large negative
  value = padding; any negative entry or an all-zero mask marks the additive form).
* ``[B or 1, 1 or H, S, S]``: bool (True = may attend) or additive float (0 = may attend,
  ``-inf`` or below half the dtype's minimum = blocked), as transformers builds for eager / SDPA.
  It is honoured exactly when it is a key padding mask (optionally causal) or block-diagonal
  (packed sequences, optionally causal and padded); any other pattern raises ``ValueError``.

Rows with no allowed key give 0, as everywhere in the package.

Float and 4D masks, and packed labels, are read by value (which tokens pad, which pattern a 4D mask
has) to choose the kernels' arguments, which no tracer can follow: under ``torch.compile`` those
reads run eagerly at a graph break (with ``fullgraph=True``: an error giving the reason), and under
``torch.export`` / ONNX export they raise ``ValueError``; a bool or integer ``[B, S]`` mask traces.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import compiler_wrappers

__all__ = ["MaskPlan", "allowed_4d", "key_padding_mask", "packed_plan", "plan_allowed", "plan_attn_mask",
           "plan_mask"]


@dataclass(frozen=True)
class MaskPlan:
    """A mask as kernel arguments: either ``key_padding_mask`` [B, S] (or None) with ``causal``, or
    packed sequences: ``index`` (flat ``b * S + s`` positions of the tokens that attend, in order),
    ``cu_seqlens`` (int32 offsets into them) and ``max_seqlen``."""

    key_padding_mask: Optional[Tensor] = None
    causal: bool = False
    index: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


def _reads_values(what: str, instead: str = "pass a bool or integer [B, S] attention_mask there"):
    """Mark a function that reads ``what`` by value (module docstring): eager calls go straight to
    it; under torch.compile it runs at a graph break, under torch.export it raises."""
    reason = (f"{what} is read by value to choose the kernels' arguments, which torch.compile(fullgraph=True) "
              f"and torch.export cannot trace: {instead}")

    def decorate(fn):
        def eager():
            try:
                return torch.compiler.disable(fn, reason=reason)
            except TypeError:  # torch < 2.8 takes no reason
                return torch.compiler.disable(fn)

        wrapper = f"reads_values_{fn.__name__}"
        compiler_wrappers.defer(wrapper, eager)

        @functools.wraps(fn)
        def read(*args, **kwargs):
            if not torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            if torch.compiler.is_exporting():
                raise ValueError(reason)
            return getattr(compiler_wrappers, wrapper)(*args, **kwargs)

        return read

    return decorate


@_reads_values("a float [B, S] attention_mask")
def _float_2d(mask: Tensor) -> Tensor:
    if bool((mask < 0).any()) or not bool(mask.any()):
        return _additive_allowed(mask, "attention_mask")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("a float [B, S] attention_mask must hold 0/1 (1 = real token) or be additive "
                         "(0 = real token, -inf or a large negative value = padding)")
    return mask != 0


@_reads_values("an additive float attention_mask")
def _additive_allowed(mask: Tensor, name: str) -> Tensor:
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise ValueError(f"an additive float {name} may hold only 0 (attend) and -inf or a large negative value "
                         "(blocked); additive score biases are not supported")
    return allowed


def key_padding_mask(attention_mask: Optional[Tensor], batch: int, seqlen: int) -> Optional[Tensor]:
    """A ``[B, S]`` mask (module docstring) as the kernels' bool key padding mask, True = real token.

    Args:
        attention_mask (torch.Tensor, Optional): ``[B, S]``, bool, integer or float.
        batch (int): B, to check the shape.
        seqlen (int): S, to check the shape.

    Returns:
        ``[B, S]`` bool, or ``None`` when ``attention_mask`` is ``None``.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must have shape [B, S] = ({batch}, {seqlen}) or [B or 1, 1 or H, S, S], "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return _float_2d(attention_mask)
    return attention_mask != 0


def allowed_4d(mask: Tensor, batch: int, seqlen: int, kv_len: Optional[int] = None,
               name: str = "attention_mask") -> Tensor:
    """``[B, S, K]`` bool (True = may attend) from a 4D mask ``[B or 1, 1 or H, S, K]`` whose heads
    agree; ``K = kv_len``, default ``S``. Errors name the argument ``name``."""
    kv_len = seqlen if kv_len is None else kv_len
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or tuple(mask.shape[-2:]) != (seqlen, kv_len):
        raise ValueError(f"{name} must have shape [B or 1, 1 or H, S, S] with B = {batch}, S = {seqlen}"
                         f"{'' if kv_len == seqlen else f' (keys: {kv_len})'}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = _additive_allowed(mask, name)
    else:
        raise TypeError(f"{'a 4D ' if name == 'attention_mask' else ''}{name} must be bool (True = may attend) "
                        f"or additive float, got {mask.dtype}")
    if allowed.shape[1] > 1:
        _check_heads_agree(allowed, name)
    return allowed[:, 0].expand(batch, seqlen, kv_len)


@_reads_values("a 4D attention_mask of several heads")
def _check_heads_agree(allowed: Tensor, name: str) -> None:
    if not bool((allowed == allowed[:, :1]).all()):
        raise ValueError(f"{'a 4D ' if name == 'attention_mask' else ''}{name} that differs between heads is not "
                         "supported")


def _packed_from_labels(labels: Tensor, attends: Tensor) -> Optional[MaskPlan]:
    """Packed plan from per-token sequence labels ``[B, S]`` (tokens with ``attends`` False are
    left out), or None when a label's tokens are not one contiguous run."""
    index = attends.flatten().nonzero().flatten()
    label, row = labels.flatten()[index], index // labels.shape[1]
    # A run starts at a new row or a new label; any label values, no row's runs merge with another's.
    starts = torch.ones_like(label, dtype=torch.bool)
    starts[1:] = (label[1:] != label[:-1]) | (row[1:] != row[:-1])
    first = starts.nonzero().flatten()
    if torch.unique(torch.stack([row[first], label[first]]), dim=1).shape[1] != first.numel():
        return None  # a label of a row in two runs
    lengths = torch.diff(first, append=torch.tensor([label.numel()], device=labels.device))
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=labels.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return MaskPlan(index=index, cu_seqlens=cu_seqlens, max_seqlen=max(int(lengths.max()), 1) if lengths.numel() else 1)


def _block_diagonal(allowed: Tensor, causal: bool) -> Optional[MaskPlan]:
    attends = allowed.any(-1)  # [B, S]
    first = allowed.to(torch.uint8).argmax(-1)  # each row's first allowed key: its sequence's start
    labels = torch.where(attends, first, -1)
    expected = (labels[:, :, None] == labels[:, None, :]) & attends[:, :, None] & attends[:, None, :]
    if causal:
        expected = expected.tril()
    if not torch.equal(expected, allowed):
        return None
    plan = _packed_from_labels(labels, attends)
    return None if plan is None else dataclasses.replace(plan, causal=causal)


def plan_mask(attention_mask: Optional[Tensor], batch: int, seqlen: int, causal: bool = False) -> MaskPlan:
    """Reduce a mask of the forms in the module docstring to kernel arguments, exactly or not at all.

    Args:
        attention_mask (torch.Tensor, Optional): ``None``, ``[B, S]`` or ``[B or 1, 1 or H, S, S]``.
        batch (int): B.
        seqlen (int): S.
        causal (bool): the layer is causal: the mask is combined with a causal one.
            Default: ``False``.

    Returns:
        MaskPlan.

    Raises:
        ValueError: a 4D mask that is neither key padding (optionally causal) nor block-diagonal.
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
        return MaskPlan(key_padding_mask(attention_mask, batch, seqlen), causal)
    return plan_allowed(allowed_4d(attention_mask, batch, seqlen), causal, tuple(attention_mask.shape))


@_reads_values("a 4D attention_mask")
def plan_allowed(allowed: Tensor, causal: bool, shape: tuple, name: str = "attention_mask") -> MaskPlan:
    """``plan_mask`` of an allowed-keys mask ``[B, S, S]`` (bool, True = may attend) that came
    from the argument ``name`` of shape ``shape``; ValueError for other patterns."""
    if allowed.shape[-1] == 0:  # no tokens: nothing to reduce
        return MaskPlan(None, causal)
    seqlen = allowed.shape[-1]
    tril = torch.ones(seqlen, seqlen, dtype=torch.bool, device=allowed.device).tril()
    if causal:
        allowed = allowed & tril
    keys = allowed[:, -1, :]  # the last query row sees every allowed key, causal or not
    for is_causal in ((True,) if causal else (False, True)):
        expected = keys[:, None, :] & tril if is_causal else keys[:, None, :].expand_as(allowed)
        if torch.equal(expected, allowed):
            return MaskPlan(None if bool(keys.all()) else keys.contiguous(), is_causal)
    for is_causal in ((True,) if causal else (False, True)):
        plan = _block_diagonal(allowed, is_causal)
        if plan is not None:
            return plan
    raise ValueError(
        f"{name} of shape {shape} is neither a key padding mask (optionally causal) "
        "nor a block-diagonal mask of packed sequences; the kernels support only those patterns"
    )


@_reads_values("attn_mask", "pass key_padding_mask [B, S] and causal=True instead, which trace")
def plan_attn_mask(attn_mask: Tensor, shape: tuple, key_padding_mask: Optional[Tensor], causal: bool) -> MaskPlan:
    """``plan_mask`` of the public functions' ``attn_mask`` (bool or additive, broadcastable to
    ``shape`` = (B, H, S, S)) combined with their ``key_padding_mask`` [B, S] and ``causal``."""
    batch, _, seqlen, _ = shape
    if not 2 <= attn_mask.dim() <= 4 or any(n not in (1, t) for n, t in zip(reversed(attn_mask.shape),
                                                                         reversed(shape))):
        raise ValueError(f"attn_mask must be broadcastable to [B, H, S, S] = {tuple(shape)} with 2 to 4 dims, "
                         f"got {tuple(attn_mask.shape)}")
    full = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    full = full.expand(full.shape[0], full.shape[1], seqlen, seqlen)
    allowed = allowed_4d(full, batch, seqlen, name="attn_mask")  # [B, S, S]
    if key_padding_mask is None:
        return plan_allowed(allowed, causal, tuple(attn_mask.shape), name="attn_mask")
    try:  # padded keys blocked; padded query rows computed, as key_padding_mask alone does
        return plan_allowed(allowed & key_padding_mask[:, None, :], causal, tuple(attn_mask.shape))
    except ValueError:  # packed sequences have no token that is a query and not a key: padded rows give 0
        real = key_padding_mask[:, None, :] & key_padding_mask[:, :, None]
        return plan_allowed(allowed & real, causal, tuple(attn_mask.shape), name="attn_mask")


@_reads_values("packed sequence labels (position_ids restarting at 0)",
               "pad the sequences and pass a [B, S] attention_mask there")
def packed_plan(sequence_ids: Tensor) -> MaskPlan:
    """Packed plan from ``[B, S]`` labels where equal neighbours are one sequence (as transformers'
    ``find_packed_sequence_indices`` returns for packed ``position_ids``); every token attends."""
    if not isinstance(sequence_ids, Tensor) or sequence_ids.dim() != 2:
        got = tuple(sequence_ids.shape) if isinstance(sequence_ids, Tensor) else type(sequence_ids).__name__
        raise ValueError(f"sequence_ids must be a [B, S] tensor of labels, got {got}")
    plan = _packed_from_labels(sequence_ids, torch.ones_like(sequence_ids, dtype=torch.bool))
    if plan is None:
        raise ValueError("packed sequence labels must form contiguous runs")
    return plan
