"""Where task files and training corpora are found, in one place for every caller (eval, run, uptrain, tests).

Order: the user's folder (`--data-dir` / recipe `data_dir`, else `$BLOCKFORMER_DATA_DIR`), then the data bundled
in the package (`blockformer/bundled/`, compressed: see its MANIFEST.md), then the Hugging Face hub. Whether the
hub can be reached is checked once per process in about two seconds, so a name found nowhere fails fast, in one
line that lists the places searched, instead of after minutes of retries.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import BlockformerError
from .io import stored_file

ENV = "BLOCKFORMER_DATA_DIR"
BUNDLED = Path(__file__).resolve().parent / "bundled"
HUB_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}


def user_data_dir(given: str | Path | None = None) -> Path | None:
    """The user's data folder: `given` (--data-dir / recipe data_dir), else $BLOCKFORMER_DATA_DIR, else None."""
    if given not in (None, ""):
        where, path = "--data-dir", Path(given).expanduser()
    elif os.environ.get(ENV):
        where, path = f"${ENV}", Path(os.environ[ENV]).expanduser()
    else:
        return None
    if not path.is_dir():  # a typo must not silently fall back to other data
        raise BlockformerError(f"{where} {path} is not a folder")
    return path


def search_dirs(given: str | Path | None = None) -> list[Path]:
    """The folders searched for data files, in order."""
    user = user_data_dir(given)
    return [user, BUNDLED] if user is not None else [BUNDLED]


def find_file(candidates: tuple[str, ...] | list[str], given: str | Path | None = None):
    """The first of `candidates` (paths relative to a data folder) found, folder by folder in search order.

    Returns (path or None, places looked). A file stored compressed (X.xz / X.gz) is found as X: read it with
    blockformer.io.open_text / read_text / read_jsonl.
    """
    looked = []
    for root in search_dirs(given):
        for rel in candidates:
            p = root / rel
            looked.append(str(p))
            if stored_file(p) is not None:
                return p, looked
    return None, looked


def find_data(spec: str, given: str | Path | None = None):
    """A training-data spec as a local file or folder: as given, then under each data folder.

    Returns (path or None, places looked); None means it can only be a hub dataset name.
    """
    p = Path(spec).expanduser()
    looked = [str(p)]
    if p.exists() or stored_file(p) is not None:
        return p, looked
    if p.is_absolute():
        return None, looked
    for root in search_dirs(given):
        q = root / p
        looked.append(str(q))
        if q.is_dir() or stored_file(q) is not None:
            return q, looked
    return None, looked


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used right now (offline mode, no connection), or None if it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"offline mode: {var}={os.environ[var]}"
    return _no_connection()


def offline_mode() -> bool:
    """True when the user turned the hub off (cached copies still load), False when it is merely unreachable."""
    return (hub_unreachable() or "").startswith("offline mode")


@functools.lru_cache(maxsize=None)
def _no_connection() -> str | None:
    """One TCP connect to the hub (or the HTTPS proxy) with a hard deadline; DNS may hang, so run it aside."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    result = [f"no answer from {host}:{port} within {HUB_TIMEOUT_S:.0f} s"]

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
            result[0] = None
        except OSError as e:
            result[0] = f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_TIMEOUT_S + 0.5)
    return result[0]
