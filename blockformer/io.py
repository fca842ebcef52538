"""Atomic output folders: written under a hidden temporary name, renamed into place only when complete."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from pathlib import Path

from .errors import BlockformerError


def check_out(out: Path, overwrite: bool, inputs=()) -> None:
    """Refuse early, before any expensive work, to touch an existing output without --overwrite, and always to
    replace a folder the run reads (`inputs`) or works in: --overwrite must never destroy the source."""
    check_not_input(out, inputs)
    if out.exists() and not overwrite:
        raise BlockformerError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BlockformerError(f"{out} exists and is not a folder")


def check_not_input(out, inputs=()) -> None:
    """One line if `out` is empty, or is (or holds) the current folder or one of the existing paths in `inputs`."""
    if str(out).strip() in ("", "."):
        raise BlockformerError(f"the output folder must be named (got {str(out)!r})")
    o = Path(out).resolve()
    for name, p in [("the current folder", Path.cwd())] + [(str(x), Path(x)) for x in inputs if x]:
        if p.exists() and (p.resolve() == o or o in p.resolve().parents):
            raise BlockformerError(f"{out} is or holds {name}, which this run reads: choose another output folder")


def ensure_writable(path: Path) -> None:
    """Fail now, in one line, if the folder `path` cannot be written (read-only, full, no permission).

    Creates the parent if needed and writes a small probe file there, where the temporary sibling will go.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _probe(path.parent / f".{path.name}.probe-{os.getpid()}")
    except OSError as e:
        raise BlockformerError(f"cannot write {path}: {e.strerror or e}") from e


def _probe(probe: Path) -> None:
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # an empty file can still be created on a full disk; data cannot
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|probe)-(?P<pid>\d+)$")


def remove_stale_temps(out: Path) -> None:
    """Remove the `.NAME.tmp-PID` / `.old-PID` / `.probe-PID` siblings killed runs left (maybe gigabytes).

    Only those of processes that no longer exist; a live PID may be another run writing right now. A dead run's
    `.old` folder is the user's previous output when it was killed mid-swap (OUT missing): it is put back.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        m = _STALE.match(p.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            p.rename(out)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists but is not ours / not a PID we can judge: keep it
        return True
    try:  # a killed process not yet reaped (a zombie, e.g. under a container init that never reaps) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# errno values that mean "the disk cannot take this output" (not EACCES: the body may also read other files);
# Rust writers (safetensors) only say "(os error N)"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _write_error(e: BaseException, out: Path) -> BlockformerError | None:
    """A one-line error for a failed write of `out` (disk full, read-only, ...), or None for other failures."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := _OS_ERROR.search(str(e))):
        code = int(m[1])
    if code not in _WRITE_ERRNOS:
        return None
    return BlockformerError(f"could not write {out}: {os.strerror(code)}; nothing was written")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed.

    A run killed outright leaves only a hidden `.NAME.tmp-PID` folder, never a folder that looks finished; the
    next run removes it. A full or read-only disk is reported in one line.
    """
    out = Path(out)
    remove_stale_temps(out)
    check_out(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _readable(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        friendly = _write_error(e, out)
        if friendly is not None:
            raise friendly from e
        raise
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


COMPRESSED = (".xz", ".gz")  # the bundled data is stored compressed; readers look for X.xz / X.gz where X is missing


def stored_file(path: Path) -> Path | None:
    """The file holding `path`'s content: `path` itself, else `path.xz` or `path.gz` beside it; None if none."""
    path = Path(path)
    if path.is_file():
        return path
    for ext in COMPRESSED:
        packed = path.with_name(path.name + ext)
        if packed.is_file():
            return packed
    return None


def open_text(path: Path, binary: bool = False, errors: str = "strict"):
    """Open `path` for reading, decompressing transparently when it is stored as `path.xz` / `path.gz`."""
    import gzip
    import lzma
    stored = stored_file(path)
    if stored is None:
        raise BlockformerError(f"{path} not found")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(stored.suffix, open)
    if binary:
        return opener(stored, "rb")
    return opener(stored, "rt", encoding="utf-8", errors=errors)


def read_text(path: Path, errors: str = "strict") -> str:
    with open_text(path, errors=errors) as f:
        return f.read()


def read_jsonl(path: Path) -> list[dict]:
    rows, i = [], 0
    try:
        with open_text(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise BlockformerError(f"{path}:{i}: malformed JSON ({e.msg})") from e
    except UnicodeDecodeError as e:  # a binary file, or another encoding: say so instead of a traceback
        raise BlockformerError(f"{path}: not UTF-8 text (a {e.object[e.start]:#04x} byte); expected JSON lines") from e
    return rows
