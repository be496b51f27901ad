"""Parameter accounting of the attention variants, counted on converted Hugging Face models.

``python -m symattn_kernels.parameter_counts`` prints, for BERT-base and BERT-small (Turc et al. 2019:
4 layers, d_model 512, 8 heads), the total parameters of ``BertModel`` per variant and of its
Q/K/V block (the self-attention projections), with the change against standard attention.
Models are built on the meta device, so nothing is allocated and the counts are those of the
converted modules themselves. Needs ``transformers``.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["BERT_BASE", "BERT_SMALL", "count_parameters", "parameter_table"]

VARIANTS = ("standard", "symmetric", "pairwise_full", "pairwise_diag", "shared")
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072)
BERT_SMALL = dict(vocab_size=30522, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)


def count_parameters(config_kwargs: dict, variant: str = "standard") -> dict:
    """Count the parameters of a ``BertModel`` converted to ``variant``.

    Args:
        config_kwargs (dict): keyword arguments of ``BertConfig``, e.g. ``BERT_BASE``.
        variant (str): ``"standard"`` (no conversion) or a variant of ``convert_bert``.
            Default: ``"standard"``.

    Returns:
        ``{"total": int, "qkv": int}``: the whole model, and the self-attention projections
        (plus coef / role vectors) of all layers.
    """
    from .integrations.hf import convert_bert  # first: without transformers it names the [hf] extra

    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(**config_kwargs))
        if variant != "standard":
            convert_bert(model, variant, init="random")
    qkv = sum(p.numel() for layer in model.encoder.layer for p in layer.attention.self.parameters())
    return {"total": sum(p.numel() for p in model.parameters()), "qkv": qkv}


def parameter_table(name: str, config_kwargs: dict) -> str:
    """A markdown table of ``count_parameters`` for every variant of one configuration."""
    counts = {variant: count_parameters(config_kwargs, variant) for variant in VARIANTS}
    base = counts["standard"]
    rows = [f"### {name} ({', '.join(f'{k}={v}' for k, v in config_kwargs.items())})", "",
            "| variant | total parameters | vs standard | Q/K/V block | vs standard |", "|---|---:|---:|---:|---:|"]
    for variant, c in counts.items():
        total_change = 100.0 * (c["total"] - base["total"]) / base["total"]
        qkv_change = 100.0 * (c["qkv"] - base["qkv"]) / base["qkv"]
        rows.append(f"| {variant} | {c['total']:,} | {total_change:+.2f} % | {c['qkv']:,} | {qkv_change:+.2f} % |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m symattn_kernels.parameter_counts",
                            description="Parameter counts of BERT-base and BERT-small for every attention variant "
                                        "(markdown tables).").parse_args(argv)
    print(parameter_table("BERT-base", BERT_BASE))
    print()
    print(parameter_table("BERT-small", BERT_SMALL))


if __name__ == "__main__":
    main()
