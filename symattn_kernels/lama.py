"""LAMA modules: low-rank multi-head context attention pooling and a BiGRU text classifier.

``LowRankContextAttention`` holds the parameters of LAMA (Mehta et al., arXiv 1912.00835;
docs/design.md, "LAMA") and makes one call to ``lowrank_context_attention``; ``LAMAClassifier`` is the
paper's text classifier (embeddings -> BiGRU -> token MLP -> LAMA -> MLP) with a helper that
returns the per-head token weights of a sentence.

Defaults the sources leave open (docs/design.md, "LAMA"): the context vector c is a learned parameter
(``context="learned"``; ``"mean"`` uses the masked mean of the token states instead, so no
parameter), the head features are l2-normalised over the heads (``head_norm="l2"``), and each
head's weights are a softmax over the real tokens (``token_softmax=True``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .interface import HEAD_NORMS, lowrank_context_attention
from .backends.registry import check_name
from .masks import key_padding_mask
from .validation import choice, flag, positive_int

__all__ = ["LowRankContextAttention", "LAMAClassifier", "masked_mean"]

CONTEXTS = ("learned", "mean")


def masked_mean(h: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Mean of ``h`` [B, T, E] over the real tokens ([B, T] bool or integer, nonzero = real): [B, E],
    0 when none. What padded positions hold never reaches it (a NaN there times a 0 weight was NaN)."""
    if key_padding_mask is None:
        return h.mean(dim=1)
    real = key_padding_mask != 0
    total = h.masked_fill(~real[..., None], 0.0).sum(dim=1)
    return total / real.sum(dim=1, keepdim=True).clamp_min(1).to(h.dtype)


class LowRankContextAttention(nn.Module):
    """LAMA pooling: m heads weigh the tokens by ``normalize(tanh((P^T c) * (Q^T u_t)))``.

    Args:
        input_size (int): E, the size of the token states (and of the token keys).
        num_heads (int): m, the number of heads (the rank of the bilinear form).
        context (str): ``"learned"``: c is a parameter [E]; ``"mean"``: c is the masked mean of h.
            Default: ``"learned"``.
        head_norm (str, Optional): ``"l2"`` or ``None``, as in ``lowrank_context_attention``.
            Default: ``"l2"``.
        token_softmax (bool): softmax over the tokens per head. Default: ``True``.
        backend (str): passed to ``lowrank_context_attention``. Default: ``"auto"``.

    Forward: ``h`` [B, T, E], ``key_padding_mask`` [B, T] bool (True = real) or None, ``u``
    [B, T, E] token keys or None (= h). Returns (pooled [B, m, E], attn [B, m, T]).
    """

    def __init__(self, input_size: int, num_heads: int, *, context: str = "learned",
                 head_norm: Optional[str] = "l2", token_softmax: bool = True, backend: str = "auto"):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        # Checked here, not only at the first forward (lowrank_context_attention checks them too).
        choice("head_norm", head_norm, HEAD_NORMS)
        check_name(backend)
        self.input_size = positive_int("input_size", input_size)
        self.num_heads = positive_int("num_heads", num_heads)
        self.context_mode, self.head_norm, self.backend = context, head_norm, backend
        self.token_softmax = flag("token_softmax", token_softmax)
        self.p = nn.Parameter(torch.empty(input_size, num_heads))
        self.q = nn.Parameter(torch.empty(input_size, num_heads))
        self.context = nn.Parameter(torch.empty(input_size)) if context == "learned" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # p^T c and q^T u_t of unit-variance c, u start with unit variance: tanh is neither flat nor saturated.
        std = self.input_size ** -0.5
        nn.init.normal_(self.p, std=std)
        nn.init.normal_(self.q, std=std)
        if self.context is not None:
            nn.init.normal_(self.context)

    def forward(self, h: Tensor, key_padding_mask: Optional[Tensor] = None, u: Optional[Tensor] = None):
        context = self.context if self.context is not None else masked_mean(h, key_padding_mask)
        return lowrank_context_attention(
            h, context.to(h.dtype), self.p.to(h.dtype), self.q.to(h.dtype), u=u, key_padding_mask=key_padding_mask,
            head_norm=self.head_norm, token_softmax=self.token_softmax, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"{self.input_size}, num_heads={self.num_heads}, context={self.context_mode!r}, "
                f"head_norm={self.head_norm!r}, token_softmax={self.token_softmax}")


class LAMAClassifier(nn.Module):
    """Text classifier of the LAMA paper: embeddings -> BiGRU -> token MLP -> LAMA -> MLP.

    The BiGRU runs on packed sequences, so padding never changes the states of real tokens. The
    token MLP (``tanh(Linear(h))``) gives the keys u_t; the m pooled vectors are concatenated
    and classified by a two-layer MLP. ``pooler`` swaps LAMA for another pooling module with the
    same call (``pooler(h, key_padding_mask) -> (pooled [B, k, 2H], weights [B, k, T])`` and a
    ``num_heads`` attribute), which keeps the encoder identical in comparisons; the token MLP
    then is not built.

    Args:
        vocab_size (int): embedding rows.
        embed_dim (int): embedding size.
        hidden_size (int): GRU size per direction (token states are 2 * hidden_size).
        num_heads (int): LAMA heads m.
        num_classes (int): output classes.
        padding_idx (int): embedding row of the padding token. Default: ``0``.
        mlp_size (int, Optional): hidden size of the classifier MLP. Default: ``hidden_size``.
        dropout (float): dropout on the embeddings and before the classifier. Default: ``0.1``.
        context, head_norm, token_softmax, backend: as in ``LowRankContextAttention``.
        pooler (nn.Module, Optional): replaces LAMA (see above). Default: ``None``.

    Forward: ``input_ids`` [B, T] long, ``attention_mask`` [B, T] or None: bool, integer or
    float 0/1 (nonzero = real token) or additive float (0 = real, -inf = padded), right-padded
    (anything else raises). Returns logits [B, num_classes].
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_heads: int, num_classes: int, *,
                 padding_idx: int = 0, mlp_size: Optional[int] = None, dropout: float = 0.1,
                 context: str = "learned", head_norm: Optional[str] = "l2", token_softmax: bool = True,
                 backend: str = "auto", pooler: Optional[nn.Module] = None):
        super().__init__()
        states = 2 * hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.encoder = nn.GRU(embed_dim, hidden_size, batch_first=True, bidirectional=True)
        if pooler is None:
            self.token_mlp = nn.Linear(states, states)
            self.attention = LowRankContextAttention(states, num_heads, context=context, head_norm=head_norm,
                                                     token_softmax=token_softmax, backend=backend)
        else:
            self.token_mlp, self.attention = None, pooler
        mlp_size = mlp_size or hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Sequential(
            nn.Linear(self.attention.num_heads * states, mlp_size), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(mlp_size, num_classes),
        )

    def attention_parameters(self) -> int:
        """Parameters of the pooling stage (LAMA with its token MLP, or the replacement pooler)."""
        modules = [m for m in (self.token_mlp, self.attention) if m is not None]
        return sum(p.numel() for m in modules for p in m.parameters())

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        """Token states h [B, T, 2H] and the bool key padding mask (None when no mask is given)."""
        x = self.dropout(self.embedding(input_ids))
        if attention_mask is None:
            h, _ = self.encoder(x)
            return h, None
        mask = self._right_padded(input_ids, attention_mask)
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = self.encoder(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=input_ids.shape[1])
        return h, mask

    @staticmethod
    def _right_padded(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The bool mask (True = real token) of a [B, T] mask in any of the package's forms
        (``masks.key_padding_mask``), which must put each row's real tokens first: the BiGRU
        packs each row's first ``length`` tokens."""
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a [B, T] tensor like input_ids {tuple(input_ids.shape)}, "
                             f"got {got}")
        mask = key_padding_mask(attention_mask, *input_ids.shape)
        prefix = torch.arange(mask.shape[1], device=mask.device) < mask.sum(dim=1, keepdim=True)
        if not torch.equal(mask, prefix):
            raise ValueError("attention_mask must be right-padded (each row's real tokens first, no gaps): the BiGRU "
                             "reads each row's first tokens")
        return mask

    def pool(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        """(pooled [B, m, 2H], token weights [B, m, T])."""
        h, mask = self.encode(input_ids, attention_mask)
        if self.token_mlp is None:
            return self.attention(h, mask)
        # .to: under autocast the Linear gives bf16 keys for the GRU's fp32 states.
        return self.attention(h, mask, u=torch.tanh(self.token_mlp(h)).to(h.dtype))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        pooled, _ = self.pool(input_ids, attention_mask)
        return self.classifier(self.dropout(pooled.flatten(1)))

    @torch.no_grad()
    def token_weights(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Per-head token weights, in eval mode: [m, T] for one sentence ([T] ids), else [B, m, T].

        Padded positions get weight 0. Pair row k with the sentence's tokens to see what head k
        attends to (the paper's interpretability figures).
        """
        single = input_ids.dim() == 1
        if single:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        was_training = self.training
        self.eval()
        try:
            _, weights = self.pool(input_ids, attention_mask)
        finally:
            self.train(was_training)
        return weights[0] if single else weights
