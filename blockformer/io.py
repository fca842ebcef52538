"""Atomic output folders: written under a hidden temporary name, renamed into place only when complete."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .errors import BlockformerError


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse early, before any expensive work, to touch an existing output without --overwrite."""
    if out.exists() and not overwrite:
        raise BlockformerError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BlockformerError(f"{out} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed.

    A run killed outright leaves only a hidden `.NAME.tmp-PID` folder, never a folder that looks finished.
    """
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)  # keep the previous result until the new one is in place
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _readable(folder: Path) -> None:
    """Some writers create files 0600 (mkstemp); give outputs the permissions the user's umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BlockformerError(f"{path}:{i}: malformed JSON ({e.msg})") from e
    return rows
