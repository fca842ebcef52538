"""The data shipped in the package: checksums and counts against its MANIFEST, the lookup order (user folder ->
$BLOCKFORMER_DATA_DIR -> bundled -> hub), and fast one-line failures when a name is found nowhere."""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import re
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from blockformer import datafiles
from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.eval.tasks import get_task, load_docs
from blockformer.io import open_text, read_jsonl, read_text
from tiny import write_synthetic_tasks

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "blockformer" / "bundled"
ROW = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \| "
                 r"([\d,]+) (items|lines|words) \|$")
# every task the package bundles, with the items a full load yields (wikitext: articles)
BUNDLED_TASKS = {"piqa": 1838, "arc_easy": 2376, "hellaswag": 10042, "lambada_openai": 5153, "wikitext": 62}


def manifest_rows():
    rows = [ROW.match(line) for line in (BUNDLED / "MANIFEST.md").read_text().splitlines()]
    return [m.groups() for m in rows if m]


def count(rel: str, text: str, unit: str) -> int:
    if unit == "words":
        return len(text.split())
    if unit == "lines":
        return text.count("\n")
    if rel.endswith(".jsonl"):
        return sum(1 for line in text.splitlines() if line.strip() and json.loads(line) is not None)
    if rel.endswith("hellaswag_val_full.txt"):
        return text.count("\n") // 6
    return sum(1 for line in text.splitlines() if line.strip())


def test_every_bundled_file_matches_its_manifest_row():
    rows = manifest_rows()
    assert len(rows) == 14  # 6 task files + 8 books
    stored = sorted(str(p.relative_to(BUNDLED)) for p in BUNDLED.rglob("*") if p.is_file() and p.name != "MANIFEST.md")
    assert stored == sorted(r[3] for r in rows), "a bundled file is missing from MANIFEST.md, or the reverse"
    for rel, size, sha, packed, packed_size, packed_sha, n, unit in rows:
        blob = (BUNDLED / packed).read_bytes()
        assert len(blob) == int(packed_size.replace(",", "")) and hashlib.sha256(blob).hexdigest() == packed_sha, packed
        assert packed == rel + (".xz" if packed.endswith(".xz") else ".gz")
        content = (lzma if packed.endswith(".xz") else gzip).decompress(blob)
        assert len(content) == int(size.replace(",", "")) and hashlib.sha256(content).hexdigest() == sha, rel
        assert count(rel, content.decode("utf-8"), unit) == int(n.replace(",", "")), rel
    books = [r for r in rows if r[0].startswith("corpus/gutenberg/")]
    assert len(books) == 8 and not any(b"PROJECT GUTENBERG EBOOK" in lzma.decompress((BUNDLED / r[3]).read_bytes())
                                       for r in books)


def test_package_data_ships_the_bundle_and_git_does_not_ignore_it():
    import tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["blockformer"]
    files = sorted(str(p.relative_to(ROOT / "blockformer")) for p in BUNDLED.rglob("*") if p.is_file())
    shipped = {f for pat in patterns for f in glob.glob(pat, root_dir=ROOT / "blockformer", recursive=True)}
    assert files and set(files) <= shipped, set(files) - shipped  # setuptools expands package-data like this
    if (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT / "blockformer", capture_output=True,
                                 text=True)
        assert ignored.stdout == "", ignored.stdout


def test_open_text_finds_compressed_files_where_plain_ones_are_looked_for(tmp_path):
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(b'{"x": 1}\n{"x": 2}\n'))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("caf\u00e9\r\n".encode()))
    (tmp_path / "c.txt").write_text("plain")
    assert read_jsonl(tmp_path / "a.jsonl") == [{"x": 1}, {"x": 2}]
    assert read_text(tmp_path / "b.txt") == "caf\u00e9\n"
    assert read_text(tmp_path / "c.txt") == "plain"
    with open_text(tmp_path / "a.jsonl", binary=True) as f:
        assert f.read().startswith(b'{"x"')
    with pytest.raises(BlockformerError, match="not found"):
        read_text(tmp_path / "d.txt")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No $BLOCKFORMER_DATA_DIR, and a decoy ../shared/data beside the working folder, which must be ignored."""
    monkeypatch.delenv(datafiles.ENV, raising=False)
    decoy = write_synthetic_tasks(tmp_path / "shared" / "data", n=3)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return decoy


@pytest.mark.parametrize("name", list(BUNDLED_TASKS))
def test_tasks_load_from_the_bundle_without_any_data_folder(clean_env, name):
    docs, source = load_docs(get_task(name), None, limit=5)
    assert source["path"].startswith(str(datafiles.BUNDLED)), source
    assert source["items_total"] == BUNDLED_TASKS[name] and len(docs) == 5
    assert len(source["sha256"]) == 64


def test_user_folder_then_env_then_bundle(clean_env, monkeypatch, tmp_path):
    env_dir = write_synthetic_tasks(tmp_path / "env", n=4)
    given = write_synthetic_tasks(tmp_path / "given", n=5)
    (given / "arc_easy" / "ARC-Easy-Test.jsonl").unlink()
    monkeypatch.setenv(datafiles.ENV, str(env_dir))
    assert load_docs(get_task("piqa"), None)[1]["items_total"] == 4           # $BLOCKFORMER_DATA_DIR
    assert load_docs(get_task("piqa"), given)[1]["items_total"] == 5          # --data-dir wins over the env
    _, arc = load_docs(get_task("arc_easy"), given, limit=3)                   # missing there: the bundle
    assert arc["path"].startswith(str(datafiles.BUNDLED)) and arc["items_total"] == 2376
    with pytest.raises(BlockformerError, match="--data-dir .*nowhere is not a folder"):
        load_docs(get_task("piqa"), tmp_path / "nowhere")
    monkeypatch.setenv(datafiles.ENV, str(tmp_path / "typo"))
    with pytest.raises(BlockformerError, match="BLOCKFORMER_DATA_DIR .*typo is not a folder"):
        load_docs(get_task("piqa"), None)


def test_uptraining_corpus_name_resolves_to_the_bundle(clean_env):
    from blockformer.pipeline.run import Job
    from blockformer.uptrain.data import read_documents
    docs = read_documents("corpus/gutenberg")
    assert len(docs) == 8 and sum(len(d.split()) for d in docs) > 1_200_000
    job = Job.__new__(Job)
    job.data_dir = None
    assert Path(job.data_path("corpus/gutenberg")) == datafiles.BUNDLED / "corpus" / "gutenberg"


@pytest.fixture
def hub_down(monkeypatch):
    """The hub unreachable (a closed local port), offline mode off: what a user without network sees."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    datafiles._no_connection.cache_clear()
    yield
    datafiles._no_connection.cache_clear()


def test_unknown_dataset_fails_fast_saying_where_it_looked(clean_env, hub_down):
    from blockformer.uptrain.data import read_documents
    t0 = time.perf_counter()
    with pytest.raises(BlockformerError) as e:
        read_documents("nobody/no-such-corpus")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "nobody/no-such-corpus" in msg and str(datafiles.BUNDLED) in msg
    assert "127.0.0.1:9" in msg


def test_task_without_local_files_fails_fast_when_the_hub_is_down(clean_env, hub_down):
    t0 = time.perf_counter()
    with pytest.raises(BlockformerError, match="allenai/ai2_arc.*127.0.0.1:9") as e:
        load_docs(get_task("arc_challenge"), None)
    assert time.perf_counter() - t0 < 5 and str(datafiles.BUNDLED / "arc_challenge") in str(e.value)


def test_unknown_hub_model_fails_fast_in_one_line(hub_down, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the model is nowhere
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["convert", "nobody/missing-model", str(tmp_path / "out")])
    assert time.perf_counter() - t0 < 5
    assert r.exit_code != 0 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
    assert "nobody/missing-model" in r.output and "127.0.0.1:9" in r.output and "cache" in r.output
    assert not (tmp_path / "out").exists()


def test_offline_mode_is_reported_without_a_network_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert datafiles.hub_unreachable() == "offline mode: HF_HUB_OFFLINE=1"
    assert time.perf_counter() - t0 < 0.5


def test_no_shared_folder_default_left():
    files = [ROOT / "README.md", *(ROOT / "blockformer").rglob("*.py"), *(ROOT / "blockformer").rglob("*.yaml"),
             *(ROOT / "docs").rglob("*.md"), *(ROOT / "scripts").iterdir()]
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files if f.is_file()
            for i, line in enumerate(f.read_text().splitlines(), 1) if "../shared" in line or "shared/data" in line]
    assert hits == []
