"""Hugging Face ``transformers`` 5.x: BERT-family conversion, warm start and attention registration.

``convert_bert(model, variant)`` swaps the self-attention of every layer of a BERT-family model
(the classes of ``SUPPORTED_ATTENTION``: BERT, RoBERTa and their plain-softmax relatives; other
``*SelfAttention`` modules with ``query`` / ``key`` / ``value`` Linears are refused) for a
``symattn_kernels.modules`` layer, in place; everything else stays, cross-attention included.
``revert_bert`` swaps the original classes back with weights that compute the same function.

Variants (docs/design.md, "Variants"): ``"symmetric"`` (key = query projection), ``"pairwise_diag"`` and
``"pairwise_full"`` (plus a coefficient ``[H, D]`` / ``[H, D, D]``), ``"shared"`` (one projection
for query, key and value, with role vectors d_q, d_k, d_v).

Initialisation with ``init="pretrained"``; values and everything outside attention are kept:

* If the weights already have the variant's structure (key weight and bias equal to the query's;
  for ``"shared"`` also the value's), they are copied and coef / role vectors are the identity:
  the converted model computes exactly what the original does.
* Otherwise each head starts from its bilinear form ``B = W_q^T W_k`` (``[d_model, d_model]``,
  logit ``x_i^T B x_j``) through the eigen-decomposition ``U diag(lam) U^T`` of its symmetric part
  (the antisymmetric part cannot be represented by a symmetric score):
  ``"symmetric"`` takes the D largest eigenvalues, clipped at 0 (the best positive semi-definite
  rank-D approximation), ``W = diag(sqrt(lam)) U^T``; ``"pairwise_diag"`` takes the D largest
  ``|lam|``, ``W = U^T``, ``coef = lam`` (signed eigenvalues); ``"pairwise_full"`` the same
  eigenpairs, ``W = diag(sqrt|lam|) U^T``, ``coef = diag(sign lam)``, a starting point that
  training can move off the diagonal. The bias is the least-squares fit of the only bias term
  that changes attention, the key-side one ``b_q^T W_k x_j`` (query-side terms are constant
  along a softmax row).
* ``"shared"``: ``W_s = W_v``, ``b_s = b_v``, ``d_v = 1``, so the values (which reach the output
  directly) are kept exactly; ``d_q * d_k = c`` per head is the least-squares fit of
  ``sum_k c_k w_k w_k^T`` to the symmetric part of B (w_k the value rows), with
  ``d_q = sign(c) sqrt|c|`` and ``d_k = sqrt|c|``.

``warm_start_report`` measures how good that start is. A converted layer's state dict is that of
a standard self-attention computing the same function (``key`` = its projection W, ``query`` = W
times the coefficient or ``d_q * d_k``, ``value`` = its value projection or W times ``d_v``) plus
its coefficient or role vectors, so a converted checkpoint (``save_pretrained``, which also
records ``symattn_variant`` in the config) is a standard one: ``cls.from_pretrained`` or
``load_state_dict`` into an unconverted model gives the converted model's outputs through
standard attention, and reports the extra tensors as unused; ``load_converted(cls, path)``
rebuilds the converted layers and reads their own weights back exactly. Loading weights without
the variant's structure into a converted model raises.

``register_attention()`` adds ``attn_implementation="symattn"``; ``convert_bert`` selects it, so
converted models receive the ``[B, S]`` padding mask instead of a materialised ``[B, 1, S, S]`` one,
and the converted layers dispatch through ``symattn_attention_forward`` with transformers' kwargs
(packing metadata). Decoders cache Y and V (shared-weight: Y only) in a ``DynamicCache``.
Not supported by converted layers: other cache classes, ``encoder_hidden_states`` (cross-attention
layers are not converted), ``output_attentions``, a changed ``config.is_decoder`` (each raises).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
try:
    from transformers import AttentionInterface, AutoConfig, DynamicCache, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices
except ImportError as err:
    raise ImportError(
        f"symattn_kernels.integrations.hf needs transformers 5.x ({err}): pip install 'symattn_kernels[hf]'"
    ) from err

from ..backends.torch import query_operand
from ..masks import allowed_4d, key_padding_mask, packed_plan, plan_mask
from ..modules import SharedWeightSelfAttention, SymmetricSelfAttention, attend

__all__ = [
    "VARIANTS",
    "convert_bert",
    "revert_bert",
    "load_converted",
    "register_attention",
    "symattn_attention_forward",
    "warm_start_report",
    "WarmStartReport",
]

VARIANTS = ("shared", "symmetric", "pairwise_diag", "pairwise_full")
ATTN_IMPLEMENTATION = "symattn"
CONFIG_KEY = "symattn_variant"
_PAIRWISE = {"symmetric": None, "pairwise_diag": "diag", "pairwise_full": "full"}


def symattn_mask(batch_size: int, *, kv_length: int, attention_mask: Optional[Tensor] = None,
                 **kwargs) -> Optional[Tensor]:
    """Mask builder for ``attn_implementation="symattn"``: the ``[B, kv_length]`` bool padding mask
    as is (True = real token), never a materialised ``[B, 1, Q, K]`` one; causality comes from the
    attention module. Called like Hugging Face's ``flash_attention_mask``, by keyword: the query
    positions arrive as ``q_length`` / ``q_offset`` (transformers 5.25 on) or ``cache_position``
    (before), the mask pattern as ``mask_function``, all unused here."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].bool()


def _packed_sequence_ids(attention_mask: Optional[Tensor], kwargs: dict, batch: int, seqlen: int) -> Optional[Tensor]:
    """``[B, S]`` sequence labels of packed sequences in transformers' convention (no mask, and
    ``cu_seq_lens_q`` or ``position_ids`` restarting at 0, as ``DataCollatorWithFlattening``
    makes), or None when the batch is not packed."""
    if attention_mask is not None:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: packed self-attention needs equal offsets")
        if int(cu_q[-1]) != batch * seqlen:
            raise ValueError(f"cu_seq_lens_q must end at the {batch * seqlen} packed tokens, got {cu_q.tolist()}")
        row_starts = torch.arange(0, batch * seqlen, seqlen, device=cu_q.device)
        if not torch.isin(row_starts, cu_q).all():
            # flash-attn's varlen call reads the rows as one stream; each row here is a batch row.
            raise ValueError(f"cu_seq_lens_q {cu_q.tolist()} runs a sequence across rows of the [{batch}, {seqlen}] "
                             f"batch: pack the sequences into one row (B = 1), as DataCollatorWithFlattening does")
        tokens = torch.arange(batch * seqlen, device=cu_q.device)
        return torch.searchsorted(cu_q[1:].to(tokens.dtype), tokens, right=True).view(batch, seqlen)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch, -1))


def _rectangular_mask(attention_mask: Optional[Tensor], sequence_ids: Optional[Tensor], q_len: int, kv_len: int,
                      causal: bool, device) -> Optional[Tensor]:
    """``[B or 1, 1, Q, K]`` bool mask for SDPA: a 4D mask as given (transformers' convention: it
    already holds causality), else padding, packing and causality with the queries the last Q keys."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return allowed_4d(attention_mask, attention_mask.shape[0], q_len, kv_len)[:, None]
    mask = None
    if attention_mask is not None:
        mask = key_padding_mask(attention_mask, attention_mask.shape[0], kv_len)[:, None, None, :]
    if sequence_ids is not None:
        same = (sequence_ids[:, :, None] == sequence_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    if causal:
        tril = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        mask = tril if mask is None else mask & tril
    return mask


def symattn_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, is_causal: Optional[bool] = None, coef: Optional[Tensor] = None,
                              **kwargs):
    """Hugging Face attention function of ``attn_implementation="symattn"``.

    When ``key is query`` (a converted layer's shared projection Y) the symmetric kernel runs:
    padded, or varlen for packed sequences (a block-diagonal 4D mask, or transformers' packing
    metadata ``cu_seq_lens_q`` / ``position_ids`` with no mask), with ``value is query`` meaning
    shared-weight attention. Otherwise (a cached decoding step, whose keys are the cached Y rows
    followed by the new ones, or a stock model's separate query and key) the query rows, times
    ``coef``, attend through PyTorch's SDPA under the same masks, causality aligned to the last
    keys. Rows with no allowed key give 0 on both routes.

    Args:
        module (nn.Module): the calling attention module; its ``is_causal`` is read when
            ``is_causal`` is ``None``.
        query, key, value (torch.Tensor): ``[B, H, Q, D]``, ``[B, H, K, D]``, ``[B, H, K, Dv]``.
        attention_mask (torch.Tensor, Optional): ``[B, K]`` padding mask (``symattn_mask``) or a
            4D mask as in ``symattn_kernels.masks``, used as given (it already holds causality).
        scaling (float, Optional): score scale. Default: ``D ** -0.5``.
        dropout (float): attention dropout probability. Default: ``0.0``.
        is_causal (bool, Optional): overrides ``module.is_causal``. Default: ``None``.
        coef (torch.Tensor, Optional): pairwise coefficient ``[H, D]`` or ``[H, D, D]``.
            Default: ``None``.
        **kwargs: transformers' extra attention arguments; ``cu_seq_lens_q`` / ``cu_seq_lens_k``
            and ``position_ids`` are read for packing, the rest is ignored.

    Returns:
        ``(out [B, Q, H, Dv], None)``: attention weights are never materialised.
    """
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask is a {type(attention_mask).__name__}, the mask of another attention "
                        f"implementation (flex_attention's BlockMask?): the symattn attention function reads "
                        f"padding masks and 4D tensors only; set the model's attn_implementation to "
                        f"'{ATTN_IMPLEMENTATION}', 'sdpa' or 'eager'")
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    mask_4d = attention_mask is not None and attention_mask.dim() == 4
    sequence_ids = _packed_sequence_ids(attention_mask, kwargs, batch, q_len) if q_len == kv_len else None
    if key is query:
        if sequence_ids is not None:
            plan = dataclasses.replace(packed_plan(sequence_ids), causal=causal)
        else:
            plan = plan_mask(attention_mask, batch, q_len, causal and not mask_4d)
        out = attend(query.transpose(1, 2), None if value is query else value.transpose(1, 2), coef, plan,
                     scale=scaling, dropout_p=dropout)
        return out, None
    mask = _rectangular_mask(attention_mask, sequence_ids, q_len, kv_len, causal and not mask_4d, query.device)
    out = F.scaled_dot_product_attention(query_operand(query, coef), key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2), None


def register_attention() -> str:
    """Register ``"symattn"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Both are needed: a name missing from the mask interface makes transformers build no mask at
    all, silently dropping padding. Idempotent. Use it with
    ``model.set_attn_implementation("symattn")`` or ``from_pretrained(..., attn_implementation="symattn")``.

    Returns:
        The implementation name, ``"symattn"``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, symattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, symattn_mask)
    return ATTN_IMPLEMENTATION


class _HFSelfAttention:
    """Hugging Face's self-attention call convention over a ``symattn_kernels.modules`` layer.

    The layer projects, updates a ``DynamicCache`` (Y and V; for shared-weight attention Y only,
    with empty values, since the values are Y) and dispatches through
    ``symattn_attention_forward`` with everything transformers passes (masks, packing metadata).
    """

    original_class: type = None
    layer_idx: Optional[int] = None
    hf_config = None  # the converted model's config (convert_bert)
    is_decoder: Optional[bool] = None  # config.is_decoder when converted (None: as causal)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_write_standard_projections)
        self.register_load_state_dict_pre_hook(_read_standard_projections)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, past_key_values=None,
                encoder_hidden_states: Optional[Tensor] = None, cache=None, **kwargs):
        # transformers < 5.25 names the cache past_key_values, later versions cache: take either.
        cache = cache if cache is not None else past_key_values
        if encoder_hidden_states is not None:
            raise ValueError("a converted self-attention layer cannot attend to encoder_hidden_states")
        if kwargs.get("output_attentions"):
            raise NotImplementedError(_NO_ATTENTIONS)
        converted_as = self.causal if self.is_decoder is None else self.is_decoder
        decoder = getattr(self.hf_config, "is_decoder", converted_as)
        if decoder != converted_as:
            # Stock models build their causal mask from is_decoder at each call (eager; SDPA may not);
            # the converted layer's causality was fixed when it was converted.
            raise ValueError(f"config.is_decoder is {decoder}, but this layer was converted with "
                             f"is_decoder={converted_as}: convert a model built with the is_decoder it should have")
        batch, seqlen, _ = hidden_states.shape
        y, v, coef = self.project(hidden_states)
        query = y.transpose(1, 2)
        key, value = query, (query if v is None else v.transpose(1, 2))
        if cache is not None:
            key, value = self._update_cache(cache, query, value if v is not None else None)
            kwargs = {k: a for k, a in kwargs.items() if k not in _PACKING_KWARGS}  # packing is for training
        out, _ = symattn_attention_forward(self, query, key, value, attention_mask,
                                           dropout=self.dropout if self.training else 0.0, is_causal=self.causal,
                                           coef=coef, **kwargs)
        out = out.reshape(batch, seqlen, self.hidden_size)
        if isinstance(self, SharedWeightSelfAttention) and self.role_scales:
            out = out * self.d_v.to(out.dtype)  # under autocast: the stock layer's dtype, not fp32
        return out, None

    def _update_cache(self, cache, query: Tensor, value: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        layers = getattr(cache, "self_attention_cache", cache)
        if not isinstance(layers, DynamicCache) or type(layers).__name__ != "DynamicCache":
            raise NotImplementedError(f"converted layers support transformers' DynamicCache only, got "
                                      f"{type(layers).__name__}")
        if self.layer_idx is None:
            raise ValueError("a converted layer without layer_idx cannot use a KV cache")
        # A cache layer holds Y (and V) as this variant writes them; what a standard layer or another
        # variant wrote there (K and V, or a different split) would be read as that, silently.
        variant = _variant_of(self)
        held = layers.layers[self.layer_idx] if self.layer_idx < len(layers.layers) else None
        writer = getattr(held, _CACHE_TAG, None)
        if held is not None and held.get_seq_length() > 0 and writer != variant:
            raise ValueError(f"past_key_values: layer {self.layer_idx} of the cache was filled by "
                             f"{f'a converted {writer} layer' if writer else 'a standard (unconverted) layer'}, "
                             f"but this converted {variant} layer caches its own projections: build the cache "
                             f"with this model")
        stored_values = query[..., :0] if value is None else value  # shared: the values are Y itself
        keys, values = layers.update(query, stored_values, self.layer_idx)
        setattr(layers.layers[self.layer_idx], _CACHE_TAG, variant)  # kept through reorders, crops and copies
        if keys.shape[2] == query.shape[2]:  # nothing cached before: a self-attention call
            return query, query if value is None else value
        return keys, keys if value is None else values


_CACHE_TAG = "_symattn_variant"  # set on the DynamicCache layers a converted layer writes
_NO_ATTENTIONS = ("converted symattn layers never materialise attention probabilities: output_attentions=True is "
                  "not supported (revert_bert gives a model that returns them)")
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")


def _projection_names(layer: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """State-dict names of ``layer``: its own projections (which the standard entries replace), the
    standard ``query`` / ``key`` / ``value`` entries, and its other tensors (coef, role vectors)."""
    linears = ("qk", "value") if isinstance(layer, SymmetricSelfAttention) else ("proj",)
    kinds = ("weight", "bias") if getattr(layer, linears[0]).bias is not None else ("weight",)
    own = tuple(f"{linear}.{kind}" for linear in linears for kind in kinds)
    standard = tuple(f"{role}.{kind}" for role in ("query", "key", "value") for kind in kinds)
    extras = tuple(name for name, p in layer.named_parameters(recurse=False) if p is not None)
    return own, standard, extras


def _standard_projections(layer: nn.Module, own: dict) -> dict:
    """Standard ``query`` / ``key`` / ``value`` Linear weights and biases computing the same
    function as ``layer`` with the parameters ``own`` (keyed by the layer's state-dict names).

    ``key`` is the converted projection W itself, so it reads back exactly; ``query`` is W times
    the coefficient (pairwise: the row ``y M``) or ``d_q * d_k`` (shared), ``value`` the value
    projection or W times ``d_v``: ``q_i . k_j`` is the converted score and the values are the same.
    """
    if isinstance(layer, SharedWeightSelfAttention):
        weight, bias = own["proj.weight"], own.get("proj.bias")
        scales = (own["d_q"] * own["d_k"], None, own["d_v"]) if layer.role_scales else (None, None, None)
        state = {}
        for role, scale in zip(("query", "key", "value"), scales):
            state[f"{role}.weight"] = weight if scale is None else scale[:, None] * weight
            state[f"{role}.bias"] = bias if scale is None or bias is None else scale * bias
    else:
        weight, bias, coef = own["qk.weight"], own.get("qk.bias"), own.get("coef")
        heads = (layer.num_heads, layer.head_dim)
        # Each input unit's column of W is a row of Y: fold M in as the kernels fold it into Y.
        columns = weight.view(*heads, -1).transpose(1, 2)[None]
        query = query_operand(columns, coef)[0].transpose(1, 2).reshape(weight.shape)
        query_bias = None if bias is None else query_operand(bias.view(1, heads[0], 1, -1), coef).flatten()
        state = {"query.weight": query, "query.bias": query_bias, "key.weight": weight, "key.bias": bias,
                 "value.weight": own["value.weight"], "value.bias": own.get("value.bias")}
    # Safetensors refuses two names for one storage: an unscaled query (or value) gets its own copy.
    seen = {_storage(t) for t in (weight, bias) if t is not None}
    for name, tensor in state.items():
        if tensor is not None and not name.startswith("key."):
            storage = _storage(tensor)
            state[name] = tensor.clone() if storage in seen else tensor
            seen.add(storage)
    return {name: tensor for name, tensor in state.items() if tensor is not None}


def _storage(tensor: Tensor) -> int:
    # A DTensor (FSDP2's sharded parameters) has no storage of its own to ask: its local shard has.
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.untyped_storage().data_ptr()


@torch.no_grad()
def _write_standard_projections(layer: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: a converted layer saves as a standard self-attention (query, key,
    value) computing the same function, plus its coefficient or role vectors. A converted
    checkpoint is thus a standard one: plain ``from_pretrained`` / ``load_state_dict`` into an
    unconverted model gives the converted model's outputs (through standard attention) and
    reports the extra tensors as unused; ``load_converted`` reads the converted layers back exactly."""
    own_names, _, extras = _projection_names(layer)
    own = {name: state.pop(prefix + name) for name in own_names}
    own.update({name: state[prefix + name] for name in extras})
    for name, tensor in _standard_projections(layer, own).items():
        state[prefix + name] = tensor


def _matches(saved: Tensor, expected: Tensor, magnitude: Tensor, terms: int) -> bool:
    """``saved`` equals ``expected``, a sum of ``terms`` products whose absolute values sum to
    ``magnitude``, up to the rounding of that sum in ``saved``'s dtype (the standard bound of a
    dot product, (terms + 1)·eps·Σ|products|): a coefficient folded on another device or in
    another order changes the last bits; untied or other weights change more."""
    if saved.shape != expected.shape:
        return False
    tol = (terms + 1) * torch.finfo(saved.dtype).eps
    saved, expected, magnitude = (t.to(saved.device).double() for t in (saved, expected, magnitude))
    return bool(((saved - expected).abs() <= tol * magnitude).all())


@torch.no_grad()
def _read_standard_projections(layer: nn.Module, state: dict, prefix: str, local_metadata, strict, missing,
                               unexpected, error_msgs) -> None:
    """Load-state-dict pre-hook, the inverse of ``_write_standard_projections``: the standard
    query / key / value entries become the layer's own (``key`` is the converted projection).
    Entries without the layer's structure (the weights of an unconverted model, or of another
    variant) are refused with an error rather than approximated. A state dict in the layer's own
    names, or without all three projections, is left to the default loading."""
    own_names, standard, extras = _projection_names(layer)
    in_own_names = any(prefix + name in state for name in own_names if name not in standard)
    if in_own_names or not all(prefix + name in state for name in standard):
        return
    source = "qk." if isinstance(layer, SymmetricSelfAttention) else "proj."
    own = {name: state[prefix + name.replace(source, "key.")] if name.startswith(source) else state[prefix + name]
           for name in own_names}
    device = own[own_names[0]].device
    own.update({name: state.get(prefix + name, getattr(layer, name)).to(device) for name in extras})
    expected = _standard_projections(layer, own)
    magnitude = _standard_projections(layer, {name: tensor.abs() for name, tensor in own.items()})
    terms = layer.head_dim if getattr(layer, "pairwise", None) == "full" else 2  # d_q·d_k·W: two roundings
    wrong = [name for name in standard
             if not _matches(state[prefix + name], expected[name], magnitude[name], terms)]
    if wrong:
        error_msgs.append(f"{prefix}query/key/value do not have the structure of a converted {_variant_of(layer)} "
                          f"layer ({wrong} "
                          f"differ from what its converted weights give): they are the weights of an unconverted "
                          f"model or of another variant; use convert_bert on that model instead")
        return
    for name in standard:
        del state[prefix + name]
    state.update({prefix + name: own[name] for name in own_names})


def _variant_of(layer: nn.Module) -> str:
    if isinstance(layer, SharedWeightSelfAttention):
        return "shared"
    return next(variant for variant, pairwise in _PAIRWISE.items() if pairwise == layer.pairwise)


class BertSymmetricSelfAttention(_HFSelfAttention, SymmetricSelfAttention):
    """``SymmetricSelfAttention`` called like Hugging Face's ``BertSelfAttention``."""


class BertSharedWeightSelfAttention(_HFSelfAttention, SharedWeightSelfAttention):
    """``SharedWeightSelfAttention`` called like Hugging Face's ``BertSelfAttention``."""


# transformers' self-attention classes that convert_bert replaces: plain softmax attention over
# query / key / value Linears, called like BertSelfAttention, each checked against its stock model.
# Other classes with the same Linears add what a converted layer would silently drop (rotary
# positions in RoFormer and ESM, relative or layout biases in LayoutLMv3 and Bros, approximate
# attention in MRA, YOSO and Nystromformer) or call it with other arguments (LUKE, CANINE,
# LayoutLM's materialised masks): they are refused, as is any subclass.
SUPPORTED_ATTENTION = frozenset({
    "BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention", "CamembertSelfAttention",
    "ElectraSelfAttention", "BertGenerationSelfAttention", "ErnieSelfAttention", "MegatronBertSelfAttention",
    "RemBertSelfAttention", "BigBirdSelfAttention", "SplinterSelfAttention", "XmodSelfAttention",
    "Data2VecTextSelfAttention", "RobertaPreLayerNormSelfAttention", "XLMRobertaXLSelfAttention",
    "RoCBertSelfAttention", "TapasSelfAttention",
})


def _is_original(module: nn.Module) -> bool:
    """A self-attention with query / key / value Linears (supported or not: _check_supported)."""
    return type(module).__name__.endswith("SelfAttention") and all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value")
    )


def _is_supported(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in SUPPORTED_ATTENTION and cls.__module__.startswith("transformers.models.")


def _check_supported(layers: list[tuple[str, nn.Module]]) -> None:
    refused = sorted({f"{type(m).__module__}.{type(m).__name__}" for _, m in layers if not _is_supported(m)})
    if refused:
        raise ValueError(
            f"convert_bert cannot convert {', '.join(refused)}: it replaces only the plain softmax self-attention of "
            f"the BERT family ({', '.join(sorted(SUPPORTED_ATTENTION))}); other attention classes may add terms "
            "(rotary positions, relative or layout biases, approximations) that a converted layer would drop")
    for name, m in layers:
        if (m.value.bias is None) != (m.query.bias is None):
            raise ValueError(f"{name}: the value projection has {'a' if m.value.bias is not None else 'no'} bias "
                             f"and the query projection {'one' if m.query.bias is not None else 'none'}; converted "
                             "layers need both with biases or both without")


_CROSS_ATTENTION = {"crossattention", "cross_attention"}
_NEVER_CAUSAL = {"TapasSelfAttention"}  # its model's mask is bidirectional even with is_decoder=True


def _find(model: nn.Module, predicate) -> list[tuple[str, nn.Module]]:
    """Every path to a module that matches: a module shared by several layers once per path."""
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False) if predicate(module)]


def _self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention layers to convert. MegatronBert, RemBert, BigBird and Tapas build their
    cross-attention from the self-attention class too; their layers hold it as ``crossattention``,
    which stays standard."""
    return [(name, module) for name, module in _find(model, _is_original)
            if not _CROSS_ATTENTION.intersection(name.split("."))]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _new_layer(old: nn.Module, variant: str, pairwise_init: str) -> _HFSelfAttention:
    hidden = old.query.in_features
    if old.query.out_features != hidden:
        raise ValueError(
            f"self-attention with {old.query.out_features} outputs for hidden size {hidden} is not supported"
        )
    # Self-attention classes of MegatronBert, RemBert, BigBird and Tapas have no is_causal: the first
    # three models build a causal mask from is_decoder, which these classes keep; TapasModel builds a
    # bidirectional one whatever is_decoder says.
    decoder = bool(getattr(old, "is_decoder", False))
    causal = getattr(old, "is_causal", None)
    causal = bool(decoder and type(old).__name__ not in _NEVER_CAUSAL if causal is None else causal)
    kw = dict(bias=old.query.bias is not None, dropout=old.dropout.p, causal=causal)
    if variant == "shared":
        new = BertSharedWeightSelfAttention(hidden, old.num_attention_heads, **kw)
    else:
        new = BertSymmetricSelfAttention(hidden, old.num_attention_heads, pairwise=_PAIRWISE[variant],
                                         pairwise_init=pairwise_init, **kw)
    new.original_class, new.layer_idx, new.is_decoder = type(old), getattr(old, "layer_idx", None), decoder
    return new.to(device=old.query.weight.device, dtype=old.query.weight.dtype).train(old.training)


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _heads(linear: nn.Linear, num_heads: int) -> tuple[Tensor, Optional[Tensor]]:
    """Weight ``[H, D, d_model]`` and bias ``[H, D]`` of a projection, in float64."""
    weight = linear.weight.detach().double().view(num_heads, -1, linear.in_features)
    bias = None if linear.bias is None else linear.bias.detach().double().view(num_heads, -1)
    return weight, bias


def _symmetric_factor(wq: Tensor, wk: Tensor, pairwise: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
    """One head: ``(W [D, d], M [D, D] or None)`` with ``W^T M W`` the module docstring's rank-D
    approximation of the symmetric part of ``wq^T wk``."""
    head_dim = wq.shape[0]
    # The symmetric part lives in the span of the 2D rows of wq and wk: decompose it there.
    basis, _ = torch.linalg.qr(torch.cat([wq, wk]).T)  # [d, k], k = min(d, 2D)
    small = (wq @ basis).T @ (wk @ basis)
    lam, vec = torch.linalg.eigh((small + small.T) / 2)
    order = (lam if pairwise is None else lam.abs()).argsort(descending=True)[:head_dim]
    lam, rows = lam[order], (basis @ vec[:, order]).T  # [D], [D, d]
    if pairwise is None:
        return lam.clamp_min(0).sqrt()[:, None] * rows, None
    if pairwise == "diag":
        return rows, torch.diag(lam)
    return lam.abs().sqrt()[:, None] * rows, torch.diag(lam.sign())


@torch.no_grad()
def _warm_start_symmetric(new: SymmetricSelfAttention, old: nn.Module) -> None:
    new.value.load_state_dict(old.value.state_dict())
    if _same(old.query.weight, old.key.weight) and _same(old.query.bias, old.key.bias):
        new.qk.load_state_dict(old.query.state_dict())
        if new.coef is not None:
            eye = torch.eye(new.head_dim, dtype=new.coef.dtype, device=new.coef.device)
            new.coef.copy_(eye.diagonal() if new.pairwise == "diag" else eye)
        return
    (wq, bq), (wk, _) = _heads(old.query, new.num_heads), _heads(old.key, new.num_heads)
    weight, bias = new.qk.weight.view(new.num_heads, new.head_dim, -1), None
    if new.qk.bias is not None:
        bias = new.qk.bias.view(new.num_heads, new.head_dim)
    for h in range(new.num_heads):
        w, m = _symmetric_factor(wq[h], wk[h], new.pairwise)
        weight[h] = w
        if new.coef is not None:
            new.coef[h] = m.diagonal() if new.pairwise == "diag" else m
        if bias is not None and bq is not None:
            side = w.T if m is None else w.T @ m.T  # [d, D]: key-side bias term is (side @ b) . x_j
            bias[h] = torch.linalg.pinv(side) @ (wk[h].T @ bq[h])


@torch.no_grad()
def _warm_start_shared(new: SharedWeightSelfAttention, old: nn.Module) -> None:
    new.proj.load_state_dict(old.value.state_dict())
    tied = all(_same(old.query.weight, other.weight) and _same(old.query.bias, other.bias)
               for other in (old.key, old.value))
    if tied or not new.role_scales:
        return
    heads = new.num_heads
    wq, wk, wv = (_heads(lin, heads)[0] for lin in (old.query, old.key, old.value))
    gram = (wv @ wv.transpose(1, 2)).square()  # <w_k w_k^T, w_l w_l^T>_F, [H, D, D]
    target = ((wv @ wq.transpose(1, 2)) * (wv @ wk.transpose(1, 2))).sum(-1)  # w_k^T wq^T wk w_k, [H, D]
    coef = (torch.linalg.pinv(gram) @ target[..., None]).squeeze(-1).flatten()
    new.d_q.copy_(coef.sign() * coef.abs().sqrt())
    new.d_k.copy_(coef.abs().sqrt())


@torch.no_grad()
def _random_init(new: nn.Module, std: float) -> None:
    # Same scheme as Hugging Face's _init_weights for BERT: N(0, initializer_range), zero bias.
    for linear in new.modules():
        if isinstance(linear, nn.Linear):
            linear.weight.normal_(0.0, std)
            if linear.bias is not None:
                linear.bias.zero_()
    if isinstance(new, SymmetricSelfAttention):
        new.reset_coef()


def _hf_roots(model: nn.Module) -> list[PreTrainedModel]:
    """The outermost Hugging Face models in ``model`` (``model`` itself if it is one)."""
    roots = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(r + ".") or r == "" for r, _ in roots):
            roots.append((name, module))
    return [m for _, m in roots]


def _owner_config(root: PreTrainedModel, name: str):
    """The config of the innermost Hugging Face model holding submodule ``name`` of ``root`` (an
    encoder-decoder's decoder layers belong to the decoder's config)."""
    owner, parts = root, name.split(".")
    for depth in range(1, len(parts)):  # the ancestors of name, outermost first
        module = root.get_submodule(".".join(parts[:depth]))
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner.config


def _refuse_attention_weights(module: nn.Module, args, kwargs) -> None:
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(module.config, "output_attentions", False)
    if requested:
        raise NotImplementedError(_NO_ATTENTIONS)


def _init_weights_with_converted(model: PreTrainedModel, module: nn.Module) -> None:
    # transformers' init_weights() (after building on the meta device and to_empty(), or to start
    # again) initialises Linears, embeddings and norms by itself; a converted layer's coef or role
    # vectors would keep whatever memory to_empty() gave them, silently.
    type(model)._init_weights(model, module)
    if isinstance(module, _HFSelfAttention):
        module.reset_parameters()


def _inherit_initialised(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the standing of the layer it replaces in transformers' ``init_weights()``,
    which skips what it initialised or loaded (modules and tensors flagged ``_is_hf_initialized``):
    a layer converted from (or reverted to) an initialised one holds real values, so a later
    ``init_weights()`` keeps them, as it keeps the stock layer's; one made from a model built on
    the meta device stays unflagged and is initialised there."""
    tensors = list(old.parameters())
    if not (getattr(old, "_is_hf_initialized", False)
            or (tensors and all(getattr(t, "_is_hf_initialized", False) for t in tensors))):
        return
    for module in new.modules():
        module._is_hf_initialized = True
    for tensor in new.parameters():
        tensor._is_hf_initialized = True


def _hook_models(root: PreTrainedModel) -> None:
    """On ``root`` and every Hugging Face model inside it: refuse ``output_attentions``
    (transformers records weights from its own attention classes only, so it would return an
    empty tuple) and let ``init_weights()`` initialise the converted layers' own parameters."""
    models = [m for m in root.modules() if isinstance(m, PreTrainedModel)]
    root._symattn_hooks = [m.register_forward_pre_hook(_refuse_attention_weights, with_kwargs=True) for m in models]
    for model in models:
        model._init_weights = functools.partial(_init_weights_with_converted, model)


def _unhook_models(root: PreTrainedModel) -> None:
    for handle in getattr(root, "_symattn_hooks", []):
        handle.remove()
    root._symattn_hooks = []
    for model in root.modules():
        if isinstance(model, PreTrainedModel) and "_init_weights" in vars(model):
            del model._init_weights


def convert_bert(model: nn.Module, variant: str, init: str = "pretrained", *, pairwise_init: str = "normal"):
    """Replace the self-attention of every layer of a BERT-family model, in place.

    Args:
        model (nn.Module):
            A Hugging Face BERT-family model (``BertModel``, ``BertForSequenceClassification``,
            ``RobertaForMaskedLM``, ...), or a module containing one.
        variant (str):
            ``"shared"``, ``"symmetric"``, ``"pairwise_diag"`` or ``"pairwise_full"``.
        init (str):
            ``"pretrained"`` starts from the model's query/key/value weights (module docstring);
            ``"random"`` initialises like BERT: N(0, ``config.initializer_range``) weights, zero
            biases, coef by ``pairwise_init``, role vectors 1. Default: ``"pretrained"``.
        pairwise_init (str):
            ``"normal"`` or ``"identity"``, for coef under ``init="random"``. Default: ``"normal"``.

    Returns:
        ``model``, converted, with ``model.config.symattn_variant = variant`` and
        ``attn_implementation="symattn"``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    if _find(model, lambda m: isinstance(m, _HFSelfAttention)):
        raise ValueError("model is already converted; call revert_bert first")
    roots = [r for r in _hf_roots(model) if _self_attention_layers(r)]
    if not roots:
        raise ValueError(f"found no BERT-family self-attention (query/key/value Linears) in a Hugging Face model "
                         f"in {type(model).__name__}")
    for root in roots:
        _check_supported(_self_attention_layers(root))
    register_attention()
    for root in roots:
        std = getattr(root.config, "initializer_range", 0.02)
        converted = {}  # a layer shared by several paths (ALBERT-style) is converted once and stays shared
        for name, old in _self_attention_layers(root):
            new = converted.get(id(old))
            if new is None:
                new = converted[id(old)] = _new_layer(old, variant, pairwise_init)
                new.hf_config = _owner_config(root, name)
                if init == "random":
                    _random_init(new, std)
                elif variant == "shared":
                    _warm_start_shared(new, old)
                else:
                    _warm_start_symmetric(new, old)
                _inherit_initialised(new, old)
            _replace(root, name, new)
        setattr(root.config, CONFIG_KEY, variant)
        root._symattn_previous_attn_implementation = getattr(root.config, "_attn_implementation", None)
        root.set_attn_implementation(ATTN_IMPLEMENTATION)
        _hook_models(root)
    return model


def _construct_original(layer: _HFSelfAttention, config) -> nn.Module:
    accepted = inspect.signature(layer.original_class.__init__).parameters
    kwargs = {"is_causal": layer.causal, "layer_idx": layer.layer_idx}
    return layer.original_class(config, **{k: v for k, v in kwargs.items() if k in accepted})


@torch.no_grad()
def _revert_layer(layer: _HFSelfAttention, config) -> nn.Module:
    """The original layer with weights computing the same function (exact up to rounding)."""
    weights = _standard_projections(layer, dict(layer.named_parameters()))
    old = _construct_original(layer, config).to(device=weights["key.weight"].device, dtype=weights["key.weight"].dtype)
    for role in ("query", "key", "value"):
        linear = getattr(old, role)
        linear.weight.copy_(weights[f"{role}.weight"])
        if linear.bias is not None:
            linear.bias.copy_(weights.get(f"{role}.bias", torch.zeros_like(linear.bias)))
    _inherit_initialised(old, layer)
    return old.train(layer.training)


def revert_bert(model: nn.Module):
    """Undo ``convert_bert``: the original self-attention classes come back, in place.

    Their weights compute the same function as the converted layers (key = the converted
    projection W, query = W times coef or ``d_q * d_k``, value = the value projection or W times
    d_v; the same weights a converted model saves), so a converted-and-trained model becomes a
    plain Hugging Face model.

    Args:
        model (nn.Module): a model converted by ``convert_bert``.

    Returns:
        ``model``, with ``symattn_variant`` removed from its config and its previous attention
        implementation (default ``"sdpa"``) restored.
    """
    roots = [r for r in _hf_roots(model) if _find(r, lambda m: isinstance(m, _HFSelfAttention))]
    if not roots:
        raise ValueError(f"{type(model).__name__} has no converted self-attention layers")
    for root in roots:
        reverted = {}  # a layer shared by several paths stays shared
        for name, layer in _find(root, lambda m: isinstance(m, _HFSelfAttention)):
            if id(layer) not in reverted:
                reverted[id(layer)] = _revert_layer(layer, _owner_config(root, name))
            _replace(root, name, reverted[id(layer)])
        if hasattr(root.config, CONFIG_KEY):
            delattr(root.config, CONFIG_KEY)
        previous = getattr(root, "_symattn_previous_attn_implementation", None)
        root.set_attn_implementation(previous if previous not in (None, ATTN_IMPLEMENTATION) else "sdpa")
        _unhook_models(root)
    return model


def _match_prefix(state: dict, model: PreTrainedModel) -> dict:
    """Checkpoint keys renamed to ``model``'s as ``from_pretrained`` does: a base-model checkpoint
    into a model with a head gains the ``base_model_prefix``; a head checkpoint into a base model
    loses it (and its head)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix == "." or not hasattr(model, prefix[:-1]):
        has_prefix = any(k.startswith(prefix) for k in state)
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if has_prefix else state
    if any(k.startswith(prefix) for k in state):
        return state
    return {prefix + k: v for k, v in state.items()}


def _saved_extras(path) -> dict:
    """The converted layers' own tensors (coef, role vectors) in a ``save_pretrained`` directory,
    under their checkpoint names; ``from_pretrained`` drops them as unused."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    extras = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            extras.update({k: weights.get_tensor(k) for k in weights.keys() if k.rsplit(".", 1)[-1] in _EXTRA_NAMES})
    return extras


_EXTRA_NAMES = ("coef", "d_q", "d_k", "d_v")


def load_converted(model_class, path, *, dtype: Optional[torch.dtype] = None, device=None):
    """Load a model that ``save_pretrained`` wrote after ``convert_bert``.

    ``model_class.from_pretrained`` loads the checkpoint as the standard model it also is (so
    every convention of ``from_pretrained`` holds: ``AutoModel*`` classes, a head class over a
    base checkpoint, whose head keeps its fresh initialisation with a warning, renamed or tied
    weights), then the model is converted to the recorded ``config.symattn_variant`` and each
    converted layer reads its own weights back exactly from the standard ones and its saved
    coefficient or role vectors. A checkpoint without a recorded variant is returned as
    ``model_class.from_pretrained`` loads it. (``from_pretrained`` alone gives the same outputs
    through standard attention.)

    Args:
        model_class (type): e.g. ``BertForSequenceClassification`` or ``AutoModelForMaskedLM``.
        path (str or os.PathLike): the ``save_pretrained`` directory.
        dtype (torch.dtype, Optional): cast to this dtype. Default: ``None`` (as saved, float32 build).
        device (torch.device, Optional): move to this device. Default: ``None`` (CPU).

    Returns:
        The converted model in eval mode, like ``from_pretrained``.

    Raises:
        ValueError: the checkpoint lacks weights of the base model, or its attention weights do not
            have the recorded variant's structure (unused weights only warn).
    """
    from transformers.utils import logging as hf_logging

    variant = getattr(AutoConfig.from_pretrained(path), CONFIG_KEY, None)
    if variant is None:
        return model_class.from_pretrained(path, dtype=dtype, device_map=device)
    saved_extras = _saved_extras(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report would list the coefficients as unused: ours follows
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    standard = {name: layer.state_dict() for name, layer in _self_attention_layers(model)}
    convert_bert(model, variant, init="random")
    extras = _match_prefix(saved_extras, model)
    for name, layer in _find(model, lambda m: isinstance(m, _HFSelfAttention)):
        own = {e: extras[f"{name}.{e}"] for e in _projection_names(layer)[2] if f"{name}.{e}" in extras}
        try:
            layer.load_state_dict({**standard[name], **own})
        except RuntimeError as err:  # weights without the recorded variant's structure, or no coefficient
            raise ValueError(f"checkpoint {path} does not match a {variant} {type(model).__name__}: {err}") from err
    prefix = model.base_model_prefix + "."
    head = [k for k in info["missing_keys"] if hasattr(model, model.base_model_prefix) and not k.startswith(prefix)]
    base = [k for k in info["missing_keys"] if k not in head]
    saved_names = {k.removeprefix(prefix) for k in saved_extras}
    unexpected = [k for k in info["unexpected_keys"] if k.removeprefix(prefix) not in saved_names]
    if base:
        raise ValueError(f"checkpoint {path} lacks weights of a {type(model).__name__}: {sorted(base)[:5]}")
    if head:
        warnings.warn(f"{type(model).__name__} weights not in {path}, newly initialised: {sorted(head)}", stacklevel=2)
    if unexpected:
        warnings.warn(f"weights in {path} that {type(model).__name__} does not use: {sorted(unexpected)}",
                      stacklevel=2)
    return model.to(device=device, dtype=dtype).eval()


@dataclass
class WarmStartReport:
    """Per-layer relative logit error and last-hidden-state agreement of a converted model."""

    layer_logit_errors: list
    hidden_rel_error: float
    hidden_cosine: float

    def __str__(self) -> str:
        lines = ["layer  rel. logit error"] + [f"{i:5d}  {e:.4f}" for i, e in enumerate(self.layer_logit_errors)]
        lines.append(f"last hidden state: rel. error {self.hidden_rel_error:.4f}, mean cosine {self.hidden_cosine:.4f}")
        return "\n".join(lines)


def _standard_logits(layer: nn.Module, hidden: Tensor) -> Tensor:
    shape = (*hidden.shape[:-1], layer.num_attention_heads, -1)
    q, k = (lin(hidden).view(shape).transpose(1, 2) for lin in (layer.query, layer.key))
    return (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5


def _converted_logits(layer: _HFSelfAttention, hidden: Tensor) -> Tensor:
    y, _, coef = layer.project(hidden)
    y = y.transpose(1, 2)
    query = y
    if coef is not None:
        query = y * coef[None, :, None, :] if coef.dim() == 2 else torch.einsum("bhsd,hde->bhse", y, coef)
    return (query @ y.transpose(-1, -2)) * y.shape[-1] ** -0.5


def _centred(logits: Tensor, keys: Tensor) -> Tensor:
    # Softmax ignores a constant per row: compare logits minus their mean over real keys.
    mean = (logits * keys).sum(-1, keepdim=True) / keys.sum(-1, keepdim=True).clamp_min(1)
    return (logits - mean) * keys


@torch.no_grad()
def warm_start_report(original: nn.Module, converted: nn.Module, **inputs) -> WarmStartReport:
    """Compare a converted model with the original it came from, before any fine-tuning.

    Per layer, both models' attention logits are computed from the original's hidden states at
    that layer (so each layer's approximation is judged alone), centred per row over real keys
    (softmax ignores a row constant), and compared over real query/key pairs:
    ``||L_conv - L_orig||_F / ||L_orig||_F``. The last hidden states are compared on real tokens:
    relative Frobenius error and mean cosine similarity.

    Args:
        original (nn.Module): the unconverted model (keep a ``copy.deepcopy`` before converting).
        converted (nn.Module): the model ``convert_bert`` returned.
        **inputs: the model inputs, e.g. ``input_ids`` and ``attention_mask``.

    Returns:
        WarmStartReport: ``layer_logit_errors``, ``hidden_rel_error``, ``hidden_cosine``.
    """
    ref = original(**inputs, output_hidden_states=True)
    new = converted(**inputs, output_hidden_states=True)
    last = ref.hidden_states[-1]
    real = inputs.get("attention_mask")
    real = torch.ones(last.shape[:2], dtype=torch.bool, device=last.device) if real is None else real.bool()
    keys = real[:, None, None, :].to(last.dtype)
    pairs = zip((m for _, m in _self_attention_layers(original)),
                (m for _, m in _find(converted, lambda m: isinstance(m, _HFSelfAttention))))
    errors = []
    for hidden, (old, layer) in zip(ref.hidden_states, pairs):
        target = _centred(_standard_logits(old, hidden), keys) * real[:, None, :, None]
        approx = _centred(_converted_logits(layer, hidden), keys) * real[:, None, :, None]
        errors.append(float((approx - target).norm() / target.norm()))
    a, b = new.hidden_states[-1][real].double(), last[real].double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
    return WarmStartReport(errors, float((a - b).norm() / b.norm()), float(cosine))
