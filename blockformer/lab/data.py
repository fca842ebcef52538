"""The lab's data: the bundled books split into training chunks and a held-out validation tail, a BPE tokenizer
trained on the training chunks only, and token rows.

Validation is the last `val_share` of every book, cut at a paragraph break: no model and not the tokenizer ever
trains on it, and every model (vanilla or block) is scored on the same rows and the same predicted positions.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..uptrain.data import read_documents

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")


def split_corpus(cfg) -> tuple[list[str], list[str]]:
    """(training chunks in a fixed shuffled order, validation texts: one tail per book)."""
    books = read_documents(cfg.data)
    if cfg.max_chars:  # a micro run: the same share of every book
        per = max(1, cfg.max_chars // len(books))
        books = [b[:per] for b in books]
    train, val = [], []
    for book in books:
        cut = int(len(book) * (1 - cfg.val_share))
        cut = book.rfind("\n\n", 0, cut) + 2 if book.rfind("\n\n", 0, cut) > 0 else cut  # a paragraph break
        val.append(book[cut:])
        train += chunks(book[:cut], cfg.chunk_chars)
    random.Random(cfg.seed).shuffle(train)
    return train, val


def chunks(text: str, size: int) -> list[str]:
    """Pieces of about `size` characters ending at line breaks, so that words are never cut."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        if text[start:end].strip():
            out.append(text[start:end])
        start = end
    return out


def write_split(out: Path, train: list[str], val: list[str]) -> None:
    """train.jsonl is what `uptrain --data` and `convert --calib-data` read; val.jsonl is kept for reference."""
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.jsonl", train), ("val.jsonl", val)):
        atomic_write_text(out / name, "".join(json.dumps({"text": d}) + "\n" for d in docs))


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, as a transformers tokenizer (saved with the vanilla model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2])


def encode(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document's ids followed by EOS, as `uptrain`'s packing does."""
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def rows(encoded: list[list[int]], seq_len: int, limit: int | None = None) -> torch.Tensor:
    """The documents' ids joined into one stream and cut into (rows, seq_len); the remainder is dropped."""
    stream = [t for ids in encoded for t in ids]
    n = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)

