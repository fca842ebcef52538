"""Zero-shot tasks with the prompts, choices and metrics of EleutherAI lm-evaluation-harness 0.4.

Each task reads its original file format from the first data folder that holds it (`--data-dir`, else
$BLOCKFORMER_DATA_DIR, then the copy bundled in the package: blockformer/datafiles.py) and falls back to the Hugging
Face dataset lm-eval itself uses. A task becomes a list of `Doc`s: the (context, continuation) pairs to
score plus what the metric needs.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import datafiles
from ..errors import BlockformerError
from ..io import open_text, read_jsonl, read_text, stored_file


@dataclass
class Doc:
    requests: list[tuple[str, str]]          # (context, continuation) pairs, one per choice
    gold: int | None = None
    lengths: list[int] = field(default_factory=list)  # characters per choice, for acc_norm
    words: int = 0                           # rolling tasks: words and bytes of the original page
    bytes: int = 0
    index: int = 0                           # the item's row in the full task file (samples.json names it)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                                # "mc" | "loglikelihood" | "rolling"
    metrics: tuple[str, ...]
    local: tuple[str, ...]                   # candidate files under the data folder, in order of preference
    hub: tuple                               # (path, name, split) of the Hugging Face dataset lm-eval uses
    read_local: Callable                     # (path) -> list of docs in the hub's field layout
    to_doc: Callable                         # hub-layout doc -> Doc

    def __post_init__(self):
        object.__setattr__(self, "read_local", text_only(self.read_local))


def text_only(read: Callable) -> Callable:
    """A reader whose non-UTF-8 input is a one-line error naming the file (a decode error names no file)."""
    def wrapped(path: Path):
        try:
            return read(path)
        except UnicodeDecodeError as e:
            raise BlockformerError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                                   "expected the task's text file") from e
    return wrapped


# ------------------------------------------------------------------------------------------ file formats
def read_labels(path: Path, n: int) -> list[str]:
    labels = [x.strip() for x in read_text(path).splitlines() if x.strip()]
    if len(labels) != n:
        raise BlockformerError(f"{path}: {len(labels)} labels for {n} items")
    return labels


def with_labels(rows: list[dict], path: Path, labels_name: str, key: str) -> list[dict]:
    lab = path.with_name(labels_name)
    if stored_file(lab) is None:
        if rows and key not in rows[0]:
            raise BlockformerError(f"{path}: no '{key}' field and no {lab.name} beside it")
        return rows
    for row, y in zip(rows, read_labels(lab, len(rows))):
        row[key] = int(y) if key == "label" else y
    return rows


def hellaswag_local(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [hellaswag_from_original(r) for r in read_jsonl(path)]
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise BlockformerError(f"{path}:{len(lines)}: expected 6 lines per item, file ends mid-item")
    docs = []
    for i in range(0, len(lines), 6):  # the derived layout: query, label, four preprocessed endings
        if not lines[i + 1].strip().isdigit():
            raise BlockformerError(f"{path}:{i + 2}: expected a label 0-3, got {lines[i + 1][:40]!r}")
        docs.append({"query": lines[i], "label": int(lines[i + 1]), "choices": lines[i + 2: i + 6]})
    return docs


def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_from_original(d: dict) -> dict:
    if "query" in d:
        return d
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(d["activity_label"] + ": " + ctx), "label": int(d["label"]),
            "choices": [hellaswag_preprocess(e) for e in d["endings"]]}


def arc_local(path: Path) -> list[dict]:
    docs = []
    for r in read_jsonl(path):  # AI2's layout nests the choices under the question
        q = r["question"]
        docs.append({"question": q["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}})
    return docs


def sciq_local(path: Path) -> list[dict]:
    return read_jsonl(path) if path.suffix == ".jsonl" else json.loads(read_text(path))


def wikitext_pages(path: Path) -> list[dict]:
    """Split the raw file into articles the way `EleutherAI/wikitext_document_level` does (62 test pages)."""
    pages, lines = [], []
    for line in read_text(path).split("\n"):
        flat = line.replace("= = =", "===").replace("= =", "==").strip()
        if flat.startswith("= ") and flat.endswith(" ="):  # a level-1 heading starts a new page
            if "\n".join(lines).strip():
                pages.append({"page": "\n".join(lines)})
            lines = []
        lines.append(line)
    if "\n".join(lines).strip():
        pages.append({"page": "\n".join(lines)})
    return pages


# (pattern, replacement, is_regex): lm-eval's wikitext detokenisation rules, applied in order
_DETOK = [("s '", "s'", 0), (r"/' [0-9]/", r"/'[0-9]/", 1), (" @-@ ", "-", 0), (" @,@ ", ",", 0),
          (" @.@ ", ".", 0), (" : ", ": ", 0), (" ; ", "; ", 0), (" . ", ". ", 0), (" ! ", "! ", 0),
          (" ? ", "? ", 0), (" , ", ", ", 0), (r"\(\s*([^\)]*?)\s*\)", r"(\1)", 1),
          (r"\[\s*([^\]]*?)\s*\]", r"[\1]", 1), (r"{\s*([^}]*?)\s*}", r"{\1}", 1),
          (r"\"\s*([^\"]*?)\s*\"", r'"\1"', 1), (r"'\s*([^']*?)\s*'", r"'\1'", 1), ("= = = =", "====", 0),
          ("= = =", "===", 0), ("= =", "==", 0), (" \u00b0 ", "\u00b0", 0), (" \n", "\n", 0), ("\n ", "\n", 0),
          (" N ", " 1 ", 0), (" 's", "'s", 0)]


def wikitext_detokenize(text: str) -> str:
    for pat, rep, regex in _DETOK:
        text = re.sub(pat, rep, text) if regex else text.replace(pat, rep)
    return text


# ------------------------------------------------------------------------------------------ docs -> requests
def mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([(context, " " + c) for c in choices], gold, [len(c) for c in choices])


def hellaswag_doc(d: dict) -> Doc:
    return mc(d["query"], d["choices"], int(d["label"]))


def winogrande_doc(d: dict) -> Doc:
    i = d["sentence"].index("_")
    target = " " + d["sentence"][i + 1:].strip()
    return Doc([(d["sentence"][:i] + opt, target) for opt in (d["option1"], d["option2"])],
               {"1": 0, "2": 1}[str(d["answer"])])


def lambada_doc(d: dict) -> Doc:
    words = d["text"].split(" ")
    return Doc([(" ".join(words[:-1]), " " + words[-1])])


def wikitext_doc(d: dict) -> Doc:
    page = d["page"]
    return Doc([("", wikitext_detokenize(page))], words=len(re.split(r"\s+", page)), bytes=len(page.encode("utf-8")))


MC = ("acc", "acc_norm")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("hellaswag", "mc", MC, ("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt"),
         ("Rowan/hellaswag", None, "validation"), hellaswag_local,
         lambda d: hellaswag_doc(hellaswag_from_original(d))),
    Task("piqa", "mc", MC, ("piqa/valid.jsonl",), ("baber/piqa", None, "validation"),
         lambda p: with_labels(read_jsonl(p), p, "valid-labels.lst", "label"),
         lambda d: mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))),
    Task("arc_easy", "mc", MC, ("arc_easy/ARC-Easy-Test.jsonl",), ("allenai/ai2_arc", "ARC-Easy", "test"), arc_local,
         lambda d: mc(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                      d["choices"]["label"].index(d["answerKey"]))),
    Task("arc_challenge", "mc", MC, ("arc_challenge/ARC-Challenge-Test.jsonl",),
         ("allenai/ai2_arc", "ARC-Challenge", "test"), arc_local,
         lambda d: mc(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                      d["choices"]["label"].index(d["answerKey"]))),
    Task("winogrande", "mc", ("acc",), ("winogrande/dev.jsonl",), ("allenai/winogrande", "winogrande_xl", "validation"),
         lambda p: with_labels(read_jsonl(p), p, "dev-labels.lst", "answer"), winogrande_doc),
    Task("sciq", "mc", MC, ("sciq/test.json", "sciq/test.jsonl"), ("allenai/sciq", None, "test"), sciq_local,
         lambda d: mc(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                      [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)),
    Task("lambada_openai", "loglikelihood", ("perplexity", "acc"), ("lambada_openai/lambada_test.jsonl",),
         ("EleutherAI/lambada_openai", "default", "test"), read_jsonl, lambada_doc),
    Task("wikitext", "rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"),
         ("wikitext2/wiki.test.raw", "wikitext/wiki.test.raw"), ("EleutherAI/wikitext_document_level",
                                                                 "wikitext-2-raw-v1", "test"),
         wikitext_pages, wikitext_doc),
]}


def default_data_dir() -> Path | None:
    """The user's data folder when no --data-dir is given: $BLOCKFORMER_DATA_DIR or None (then the bundled copy)."""
    return datafiles.user_data_dir(None)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BlockformerError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_docs(task: Task, data_dir: Path | None, limit: int | None = None, seed: int = 1234):
    """The task's Docs (a fixed-seed subset when `limit` is set) and where they came from."""
    raw, source = _read(task, data_dir)
    if not raw:
        raise BlockformerError(f"{task.name}: {source['path']} holds no items")
    docs = []
    for i in subset_index(len(raw), limit, seed):
        try:
            docs.append(task.to_doc(raw[i]))
            docs[-1].index = i
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise BlockformerError(f"{source['path']}: item {i + 1} is malformed ({type(e).__name__}: {e})") from e
    return docs, {**source, "items_total": len(raw), "items": len(docs)}


def subset_index(n: int, limit: int | None, seed: int) -> list[int]:
    """Rows of a task file that `--limit` evaluates: a fixed-seed sample, in file order (the lm-eval export's too)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _read(task: Task, data_dir: Path | None):
    p, looked = datafiles.find_file(task.local, data_dir)
    if p is not None:
        return task.read_local(p), {"path": str(p), "sha256": _sha256(p)}
    where = ", ".join(looked)
    reason = datafiles.hub_unreachable()
    if reason and not datafiles.offline_mode():  # offline mode may still load a cached copy; no network: fail now
        raise BlockformerError(f"no data for '{task.name}': looked in {where}; the Hugging Face dataset "
                               f"{task.hub[0]} is out of reach ({reason}); put the files there or pass --data-dir")
    try:
        import datasets
        path, name, split = task.hub
        ds = datasets.load_dataset(path, name, split=split)
        return list(ds), {"path": f"hf://{path}/{name or ''}:{split}", "sha256": ds._fingerprint}
    except Exception as e:  # noqa: BLE001 - offline, missing package, renamed dataset...
        raise BlockformerError(f"no data for '{task.name}': looked in {where}, and the Hugging Face dataset "
                               f"{task.hub[0]} could not be loaded ({type(e).__name__}); put the files there "
                               f"or pass --data-dir") from e


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open_text(p, binary=True) as f:  # of the content, also when it is stored compressed
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
