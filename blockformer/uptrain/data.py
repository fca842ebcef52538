"""Training data: text files, jsonl/parquet, or a Hugging Face dataset -> packed, block-aligned token rows.

Documents are tokenised, joined with EOS and packed into rows of `seq_len` tokens (a multiple of the block length).
Following the paper, each document is preceded by U{0..L_B-1} pad tokens (masked, never predicted), so that the
model sees documents at every alignment to block boundaries. The first rows form a held-out validation slice.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import datafiles
from ..errors import BlockformerError
from ..io import COMPRESSED, read_jsonl, read_text

TEXT_SUFFIXES = {".txt", ".md", ".text"}


@dataclass
class Packed:
    ids: torch.Tensor       # (rows, seq_len)
    mask: torch.Tensor      # (rows, seq_len) bool: real tokens
    labels: torch.Tensor    # (rows, seq_len): -100 where nothing is predicted
    n_val: int              # the first n_val rows are the validation slice
    documents: int
    tokens: int

    def train(self, i: int):
        return self.ids[self.n_val + i], self.mask[self.n_val + i], self.labels[self.n_val + i]

    @property
    def n_train(self) -> int:
        return self.ids.shape[0] - self.n_val


def read_documents(spec: str, field: str = "text", split: str = "train", max_docs: int | None = None) -> list[str]:
    """Documents from a file, a folder of files, or a Hugging Face dataset name (streamed).

    A relative name is a local path first, then a folder under $BLOCKFORMER_DATA_DIR and the bundled data (so
    `corpus/gutenberg` is the bundled books), and only then a dataset on the hub.
    """
    p, looked = datafiles.find_data(spec)
    if p is not None and p.is_dir():
        files = sorted({_logical(f) for f in p.rglob("*") if f.is_file()} - {None})
        if not files:
            raise BlockformerError(f"{spec} holds no .txt, .jsonl or .parquet files")
        docs = [d for f in files for d in _read_file(f, field)]
    elif p is not None:
        docs = _read_file(_logical(p) or p, field)
    elif "/" in spec and not spec.startswith((".", "/", "~")):
        docs = _read_hub(spec, field, split, max_docs, looked)
    else:
        raise BlockformerError(f"--data {spec} not found (a text/jsonl/parquet file, a folder, or a dataset name); "
                               f"looked in {', '.join(looked)}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise BlockformerError(f"--data {spec} holds no text")
    return docs[:max_docs] if max_docs else docs


def _logical(f: Path) -> Path | None:
    """A data file under the name readers look for (`a.txt.xz` is read as `a.txt`); None for other files."""
    name = f.with_suffix("") if f.suffix in COMPRESSED else f
    return name if name.suffix in TEXT_SUFFIXES | {".jsonl", ".parquet"} else None


def _read_file(path: Path, field: str) -> list[str]:
    if path.suffix in TEXT_SUFFIXES:
        return [normalise(read_text(path, errors="replace"))]
    if path.suffix == ".jsonl":
        return [_field(r, field, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BlockformerError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        if field not in table.column_names:
            raise BlockformerError(f"{path} has no column '{field}' (columns: {', '.join(table.column_names)})")
        return [_field({field: x}, field, f"{path}: row {i + 1}") for i, x in enumerate(table.column(field).to_pylist())]
    raise BlockformerError(f"{path}: unsupported file type (use .txt, .jsonl or .parquet)")


def _field(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise BlockformerError(f"{where}: no field '{field}' (fields: {', '.join(row)}); set --text-field")
    if row[field] is None:  # a missing text: an empty document, dropped with the blank ones
        return ""
    if not isinstance(row[field], str):  # str() would silently train on "5" or "[1, 2]"
        raise BlockformerError(f"{where}: field '{field}' holds {type(row[field]).__name__}, not text")
    return row[field]


def _read_hub(name: str, field: str, split: str, max_docs: int | None, looked: list[str]) -> list[str]:
    reason = datafiles.hub_unreachable()  # streaming needs the network: without it, fail now, not after retries
    if reason:
        raise BlockformerError(f"--data {name}: no such file or folder (looked in {', '.join(looked)}) and the "
                               f"Hugging Face hub is out of reach ({reason})")
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split, streaming=True)
        out = []
        for row in ds:
            out.append(_field(row, field, name))
            if max_docs and len(out) >= max_docs:
                break
        return out
    except BlockformerError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BlockformerError(f"could not stream dataset {name}: {type(e).__name__} (no local file or folder "
                               f"either: looked in {', '.join(looked)})") from e


def normalise(text: str) -> str:
    """CRLF to LF; drop Project Gutenberg's START/END marker lines."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(x for x in lines if not x.startswith("*** START OF") and not x.startswith("*** END OF"))


def pack(docs: list[str], tokenizer, seq_len: int, block_length: int, val_fraction: float = 0.05,
         seed: int = 0, chunk_chars: int = 20000) -> Packed:
    """Tokenise, pad each document's front by U{0..L_B-1}, join with EOS, cut into rows of seq_len."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rng = random.Random(seed)
    ids, real, target = [], [], []
    for doc in docs:
        n_pad = rng.randrange(block_length)
        toks = [t for i in range(0, len(doc), chunk_chars)  # long books: tokenise in chunks
                for t in tokenizer.encode(doc[i:i + chunk_chars], add_special_tokens=False)] + [eos]
        ids += [pad] * n_pad + toks
        real += [False] * n_pad + [True] * len(toks)
        # the token right after the pads has no real predecessor in its document: not a target
        target += [False] * n_pad + [n_pad == 0] + [True] * (len(toks) - 1)
    rows = len(ids) // seq_len
    if rows < 2:
        raise BlockformerError(f"the data holds {len(ids)} tokens: fewer than two rows of --seq-len {seq_len}")
    cut = lambda xs, dt: torch.tensor(xs[: rows * seq_len], dtype=dt).view(rows, seq_len)  # noqa: E731
    ids_t, mask_t = cut(ids, torch.long), cut(real, torch.bool)
    labels = torch.where(cut(target, torch.bool), ids_t, torch.full_like(ids_t, -100))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))  # validation: a random slice
    n_val = max(1, round(rows * val_fraction))
    return Packed(ids_t[order], mask_t[order], labels[order], n_val, len(docs), int(mask_t.sum()))
