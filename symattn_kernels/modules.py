"""Drop-in self-attention layers: parameters plus one call to a public attention function.

Every module maps hidden states ``[B, S, d_model]`` and an optional Hugging Face style attention
mask to the attention output ``[B, S, d_model]`` before the output projection, the scope of
Hugging Face's ``BertSelfAttention`` (the output projection stays with the caller, as in
``BertSelfOutput``). docs/design.md gives the math; the attention itself runs in
``symmetric_attention`` / ``shared_attention`` with ``backend="auto"``, never here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .interface import attend_planned as attend  # attention under a MaskPlan: padded or packed
from .masks import allowed_4d, key_padding_mask, plan_mask
from .validation import flag, positive_int

__all__ = [
    "SharedWeightSelfAttention",
    "SymmetricSelfAttention",
    "StandardSelfAttention",
    "attend",
    "key_padding_mask",
]

PAIRWISE = (None, "diag", "full")
PAIRWISE_INIT = ("normal", "identity")


def _head_dim(hidden_size: int, num_heads: int) -> int:
    positive_int("hidden_size", hidden_size)
    positive_int("num_heads", num_heads)
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    return hidden_size // num_heads


def _states(module: nn.Module, hidden_states: Tensor) -> tuple[int, int]:
    """(B, S) of ``hidden_states``, checked to be ``[B, S, hidden_size]``."""
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != module.hidden_size:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must have shape [B, S, hidden_size] with hidden_size = {module.hidden_size}, "
                         f"got {got}")
    return hidden_states.shape[0], hidden_states.shape[1]


def _dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


class SymmetricSelfAttention(nn.Module):
    """Symmetric self-attention (Courtois et al. 2024): one projection is query and key.

    ``Y = X W + b`` split into heads is both query and key, ``V = X W_v + b_v``; the scores are
    ``scale * Y M Y^T`` with ``M`` the identity, ``diag(coef[h])`` (``pairwise="diag"``) or
    ``coef[h]`` (``pairwise="full"``, the released code's H x d x d matrix, not symmetrised).

    Args:
        hidden_size (int):
            d_model.
        num_heads (int):
            H; ``hidden_size`` must be a multiple of it.
        pairwise (str, Optional):
            ``None``, ``"diag"`` (coef ``[H, D]``) or ``"full"`` (coef ``[H, D, D]``).
            Default: ``None``.
        pairwise_init (str):
            ``"normal"`` draws coef from N(0, 1), as published; ``"identity"`` starts from M = I.
            Default: ``"normal"``.
        bias (bool):
            Biases on both projections. Default: ``True``.
        dropout (float):
            Dropout on the attention weights in training mode. Default: ``0.0``.
        causal (bool):
            Token i attends to tokens j <= i. Default: ``False``.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, pairwise: Optional[str] = None,
                 pairwise_init: str = "normal", bias: bool = True, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if pairwise not in PAIRWISE:
            raise ValueError(f"pairwise must be None, 'diag' or 'full', got {pairwise!r}")
        if pairwise_init not in PAIRWISE_INIT:
            raise ValueError(f"pairwise_init must be 'normal' or 'identity', got {pairwise_init!r}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = _head_dim(hidden_size, num_heads)
        self.pairwise, self.pairwise_init = pairwise, pairwise_init
        self.dropout, self.causal = _dropout(dropout), flag("causal", causal)
        self.qk = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        shape = {"diag": (num_heads, self.head_dim), "full": (num_heads, self.head_dim, self.head_dim)}.get(pairwise)
        self.coef = None if shape is None else nn.Parameter(torch.empty(shape))
        self.reset_coef()

    def reset_parameters(self) -> None:
        """Initialise this module's own parameter, ``coef`` (``reset_coef``), as at construction: what
        ``nn.Module.to_empty`` after building on the meta device needs, and what FSDP's and
        torchtitan-style initialisation call on every module. The projections are ``nn.Linear``
        children, which reset themselves."""
        self.reset_coef()

    def reset_coef(self) -> None:
        """Re-draw ``coef`` according to ``pairwise_init``."""
        if self.coef is None:
            return
        with torch.no_grad():
            if self.pairwise_init == "normal":
                self.coef.normal_()
            elif self.pairwise == "diag":
                self.coef.fill_(1.0)
            else:
                self.coef.copy_(torch.eye(self.head_dim).expand_as(self.coef))

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The kernel's operands: ``y`` and ``v`` ``[B, S, H, D]`` and ``coef`` (or ``None``)."""
        heads = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        return self.qk(hidden_states).view(heads), self.value(hidden_states).view(heads), self.coef

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Attend: ``[B, S, d_model]`` to ``[B, S, d_model]``.

        ``attention_mask`` is ``[B, S]`` (bool / integer: nonzero = real token; float: 0/1 or additive)
        or ``[B or 1, 1 or H, S, S]`` (bool, True = may attend, or additive float), combined with
        ``causal``. A 4D mask must be key padding or block-diagonal (packed sequences), which run
        exactly through the padded or the varlen kernel; any other pattern raises ValueError
        (``symattn_kernels.masks``)."""
        batch, seqlen = _states(self, hidden_states)
        y, v, coef = self.project(hidden_states)
        plan = plan_mask(attention_mask, batch, seqlen, self.causal)
        out = attend(y, v, coef, plan, dropout_p=self.dropout if self.training else 0.0)
        return out.reshape(batch, seqlen, self.hidden_size)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, pairwise={self.pairwise!r}, dropout={self.dropout}, causal={self.causal}"


class SharedWeightSelfAttention(nn.Module):
    """Shared-weight self-attention (Kowsher et al. 2025): one projection is query, key and value.

    ``Y = X W_s + b_s``; with ``role_scales`` the roles are ``Y diag(d_q)``, ``Y diag(d_k)`` and
    ``Y diag(d_v)`` (vectors of length d_model, initialised to 1), so the scores are
    ``scale * Y diag(d_q * d_k) Y^T`` (the kernel's diagonal coef, per head) and the output is the
    kernel's ``P Y`` times ``d_v`` per channel, which equals ``P (Y diag(d_v))``.

    Args:
        hidden_size (int):
            d_model.
        num_heads (int):
            H; ``hidden_size`` must be a multiple of it.
        bias (bool):
            Bias on W_s. Default: ``True``.
        role_scales (bool):
            Learn d_q, d_k, d_v; without them the roles are Y itself. Default: ``True``.
        dropout (float):
            Dropout on the attention weights in training mode. Default: ``0.0``.
        causal (bool):
            Token i attends to tokens j <= i. Default: ``False``.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool = True, role_scales: bool = True,
                 dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = _head_dim(hidden_size, num_heads)
        self.dropout, self.causal = _dropout(dropout), flag("causal", causal)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.role_scales = flag("role_scales", role_scales)
        for name in ("d_q", "d_k", "d_v"):
            self.register_parameter(name, nn.Parameter(torch.ones(hidden_size)) if role_scales else None)

    def reset_parameters(self) -> None:
        """Set this module's own parameters, the role vectors, to 1 as at construction (see
        ``SymmetricSelfAttention.reset_parameters``); ``proj`` resets itself."""
        if self.role_scales:
            with torch.no_grad():
                for scale in (self.d_q, self.d_k, self.d_v):
                    scale.fill_(1.0)

    def project(self, hidden_states: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The kernel's operands: ``y`` ``[B, S, H, D]``, ``None`` (values are ``y``), coef ``[H, D]``."""
        y = self.proj(hidden_states).view(*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        coef = (self.d_q * self.d_k).view(self.num_heads, self.head_dim) if self.role_scales else None
        return y, None, coef

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Same as ``SymmetricSelfAttention.forward``."""
        batch, seqlen = _states(self, hidden_states)
        y, _, coef = self.project(hidden_states)
        plan = plan_mask(attention_mask, batch, seqlen, self.causal)
        out = attend(y, None, coef, plan, dropout_p=self.dropout if self.training else 0.0)
        out = out.reshape(batch, seqlen, self.hidden_size)
        # d_v in the output's dtype: under autocast an fp32 d_v would promote the bf16 / fp16 output.
        return out * self.d_v.to(out.dtype) if self.role_scales else out

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, causal={self.causal}"


class StandardSelfAttention(nn.Module):
    """Standard multi-head self-attention (separate W_q, W_k, W_v) through PyTorch's SDPA.

    The baseline for comparisons; same interface as ``SymmetricSelfAttention`` (a query row with
    no allowed key gives 0, as there).

    Args:
        hidden_size (int): d_model.
        num_heads (int): H.
        bias (bool): Biases on the projections. Default: ``True``.
        dropout (float): Dropout on the attention weights in training mode. Default: ``0.0``.
        causal (bool): Token i attends to tokens j <= i. Default: ``False``.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = _head_dim(hidden_size, num_heads)
        self.dropout, self.causal = _dropout(dropout), flag("causal", causal)
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Same as ``SymmetricSelfAttention.forward``."""
        batch, seqlen = _states(self, hidden_states)
        heads = (batch, seqlen, self.num_heads, self.head_dim)
        q, k, v = (proj(hidden_states).view(heads).transpose(1, 2) for proj in (self.query, self.key, self.value))
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = allowed_4d(attention_mask, batch, seqlen)[:, None]
        else:
            keys = key_padding_mask(attention_mask, batch, seqlen)
            mask = None if keys is None else keys[:, None, None, :]
        if mask is not None and self.causal:
            mask = mask & torch.ones(seqlen, seqlen, dtype=torch.bool, device=mask.device).tril()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )
        if mask is not None:
            # Rows with no allowed key: SDPA's answer varies (NaN, 0, and the mean of the values in
            # an ONNX export), so set it to the other modules' 0.
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return out.transpose(1, 2).reshape(batch, seqlen, self.hidden_size)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, causal={self.causal}"
