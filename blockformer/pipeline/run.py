"""`blockformer run RECIPE`: convert -> uptrain -> eval -> bench -> report, one command, resumable.

    blockformer run recipes/smollm2-135m-cpu.yaml               # the default job, ~25 min on 2 CPU cores
    blockformer run recipes/smollm2-135m-cpu.yaml --force       # redo every stage
    blockformer run tests/recipe-tiny.yaml                      # what the tests run (seconds), see tests/test_run.py

Each stage writes its own folder under the recipe's `out` and, once that folder is complete, a marker
`stages/NAME.json` holding the hash of the stage's inputs (its options, the upstream stages' hashes, sizes and
times of the files it reads). A re-run skips stages whose marker matches; an interrupted uptraining resumes from its
last checkpoint; everything downstream of a changed stage is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import datafiles, sources
from ..errors import BlockformerError
from ..eval.harness import resolve_device
from ..io import atomic_write_text, check_not_input
from ..machine import cpu_name
from ..uptrain.config import data_specs
from .recipe import SYNTH_DATA, Recipe, load_recipe

STAGES = ("convert", "synth", "uptrain", "eval", "bench", "report")


@dataclass
class RunConfig:
    recipe: str | None = None       # a YAML path or a shipped recipe's name; None: the default recipe
    out: str | None = None          # overrides the recipe's `out`
    force: bool = False             # redo every stage
    overwrite: bool = False         # allowed to replace a folder that is not a blockformer run


def run(cfg: RunConfig, log=print) -> dict:
    recipe = load_recipe(cfg.recipe)
    root = Path(cfg.out or recipe.out)
    data_dir = datafiles.user_data_dir(recipe.data_dir)  # or $BLOCKFORMER_DATA_DIR; None: bundled data, then hub
    check_not_input(root, [recipe.source, recipe.path, data_dir])  # --overwrite would delete what it reads
    prepare_root(root, cfg.overwrite)
    (root / "recipe.yaml").write_text("# the recipe as run, every default filled in\n"
                                      + yaml.safe_dump(resolved(recipe), sort_keys=False))
    job = Job(root, recipe, data_dir, cfg.force, log)
    t0 = time.perf_counter()
    results = job.all()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    from .report import summary, write_report
    write_report(root, results)
    for line in summary(results):
        log(line)
    log(f"report: {root / 'report.html'} (also report.md, results.json) in {results['seconds']:.0f} s")
    return results


def prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise BlockformerError(f"{root} exists and is not a folder")
    if root.exists() and any(root.iterdir()) and not (root / "stages").is_dir():
        if not overwrite:
            raise BlockformerError(f"{root} exists and is not a blockformer run folder; pass --overwrite to replace "
                                   f"it or set another `out`")
        shutil.rmtree(root)
    (root / "stages").mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.html", "results.json"):  # a stale report must not outlive an unfinished run
        (root / name).unlink(missing_ok=True)


def resolved(recipe: Recipe) -> dict:
    return {k: getattr(recipe, k) for k in ("path", "source", "out", "data_dir", "convert", "synth", "uptrain", "eval",
                                            "bench")}


class Job:
    """The stages of one recipe; every stage returns a JSON-able result that the report reads."""

    def __init__(self, root: Path, recipe: Recipe, data_dir: Path | None, force: bool, log):
        self.root, self.recipe, self.data_dir, self.force, self.log = root, recipe, data_dir, force, log
        self.source_fp = fingerprint(recipe.source)
        self.timings: dict[str, float] = {}   # seconds each stage took when it ran (this time or before)
        self.reused: list[str] = []

    def all(self) -> dict:
        conv = self.convert()
        train = self.recipe.enabled("uptrain")
        syn = self.synth() if train and SYNTH_DATA in data_specs(self.recipe.uptrain["data"]) else None
        up = self.uptrain(conv, syn) if train else None
        models = {"original": (self.recipe.source, self.source_fp), "converted": (conv["dir"], conv["key"])}
        if up:
            models["uptrained"] = (up["model_dir"], up["key"])
        ev = {role: self.eval(role, *spec) for role, spec in models.items()} if self.recipe.enabled("eval") else {}
        bench = self.bench(conv) if self.recipe.enabled("bench") else None
        return {"recipe": resolved(self.recipe), "convert": conv, "synth": syn, "uptrain": up, "eval": ev, "bench": bench,
                "stage_seconds": self.timings, "reused_stages": self.reused, "environment": environment()}

    # ------------------------------------------------------------------------------------------- stages
    def convert(self) -> dict:
        from ..convert import ConvertConfig, convert
        opts = self.recipe.options("convert")
        out = self.root / "converted"
        key = digest("convert", self.source_fp, opts)

        def work():
            s = convert(ConvertConfig(self.recipe.source, out, overwrite=True, **opts))
            return {**s, "dir": str(out)}
        return self.stage("convert", key, out / "config.json", work)

    def synth(self) -> dict:
        from ..uptrain.synth import SynthConfig, synth
        opts = self.recipe.options("synth")
        opts["kinds"] = tuple(opts["kinds"])
        out = self.root / "synth" / "teacher.jsonl"
        key = digest("synth", self.source_fp, opts)

        def work():  # synth makes the folder
            return {**synth(SynthConfig(self.recipe.source, out, overwrite=True, **opts)), "file": str(out)}
        return self.stage("synth", key, out, work)

    def uptrain(self, conv: dict, syn: dict | None) -> dict:
        from ..uptrain import UptrainConfig, uptrain
        from ..uptrain.train import latest_checkpoint
        opts = self.recipe.options("uptrain")
        data = [syn["file"] if d == SYNTH_DATA else self.data_path(d) for d in data_specs(opts["data"])]
        opts["data"] = data[0] if len(data) == 1 else tuple(data)
        opts["teacher"] = self.recipe.source if opts["teacher"] == "source" else opts["teacher"]
        opts["freeze"] = tuple(opts["freeze"])
        out = self.root / "uptrained"
        data_fp = fingerprint(data[0]) if len(data) == 1 else [fingerprint(d) for d in data]
        key = digest("uptrain", conv["key"], opts, data_fp, fingerprint(opts["teacher"]))
        pending = self.root / "stages" / "uptrain.pending"

        def work():
            resume = (pending.exists() and pending.read_text() == key and latest_checkpoint(out) is not None
                      and not self.force)
            if resume:
                self.log(f"uptrain: resuming from {latest_checkpoint(out)}")
            pending.write_text(key)
            state = uptrain(UptrainConfig(conv["dir"], out=out, resume=resume, overwrite=not resume, **opts))
            pending.unlink()
            summary = json.loads((out / "summary.json").read_text())
            return {**summary, "history": state["history"], "model_dir": str(out / "model"),
                    "loss_png": str(out / "loss.png"), "teacher": opts["teacher"], "data": opts["data"]}
        return self.stage("uptrain", key, out / "model" / "config.json", work)

    def eval(self, role: str, spec: str, upstream) -> dict:
        from ..eval import EvalConfig, evaluate
        opts = self.recipe.options("eval")
        opts["tasks"] = tuple(opts["tasks"])
        out = self.root / "eval" / role
        data = [fingerprint(d, skip=("corpus",)) for d in datafiles.search_dirs(self.data_dir)]
        key = digest("eval", upstream, opts, data)

        def work():
            r = evaluate(EvalConfig(spec, data_dir=self.data_dir, out=out, overwrite=True, role=role, **opts))
            return {"model": spec, "seconds": r["seconds"], "items": {t: len(e["samples"][role])
                                                                      for t, e in r["tasks"].items()},
                    "metrics": {t: e["metrics"][role] for t, e in r["tasks"].items()}}
        return self.stage(f"eval-{role}", key, out / "results.json", work)

    def bench(self, conv: dict) -> dict:
        from .. import bench as B
        opts = self.recipe.options("bench")
        opts["scenarios"] = {k: tuple(v) for k, v in opts["scenarios"].items()}
        opts["batch_sizes"] = tuple(opts["batch_sizes"]) if opts["batch_sizes"] else None
        opts["device"] = resolve_device(opts["device"])
        out = self.root / "bench"
        key = digest("bench", conv["key"], self.source_fp, opts)

        def work():
            res = B.run_bench(B.BenchConfig(conv["dir"], self.recipe.source, **opts), log=self.log)
            B.write(res, out)  # atomic; this stage's own folder, replaced when the stage reruns
            return {**res, "table": B.table(res), "png": str(out / "throughput.png")}
        return self.stage("bench", key, out / "bench.json", work)

    # ------------------------------------------------------------------------------------------- helpers
    def stage(self, name: str, key: str, product: Path, work) -> dict:
        marker = self.root / "stages" / f"{name}.json"
        if not self.force and marker.exists() and product.exists():
            saved = json.loads(marker.read_text())
            if saved["key"] == key:
                self.log(f"[{name}] up to date (inputs unchanged), skipped")
                self.timings[name] = saved["seconds"]
                self.reused.append(name)
                return saved["result"]
        self.log(f"[{name}] running")
        marker.unlink(missing_ok=True)  # an interrupted stage must never look finished
        t0 = time.perf_counter()
        result = {**work(), "key": key}
        self.timings[name] = round(time.perf_counter() - t0, 1)
        record = {"key": key, "seconds": self.timings[name], "finished": time.strftime("%FT%T%z"), "result": result}
        atomic_write_text(marker, json.dumps(record, indent=2, default=str) + "\n")
        self.log(f"[{name}] done in {self.timings[name]:.0f} s")
        return result

    def data_path(self, spec: str) -> str:
        """A local path as given, else under the recipe's data folder, then the bundled data; else a dataset id."""
        p, _ = datafiles.find_data(spec, self.data_dir)
        return str(p) if p is not None else spec


def fingerprint(spec, skip: tuple[str, ...] = ()):
    """Cheap identity of a model or data input: names, sizes and modification times of its files."""
    if spec is None:
        return None
    p = sources.default_gguf() if spec == "default" else Path(spec).expanduser()
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.relative_to(p).parts[0] not in skip]
        return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return str(spec)  # a hub id: its name is all we can know offline


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def environment() -> dict:
    import platform
    from importlib.metadata import version
    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("blockformer", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing optional package is simply not listed
            pass
    return env
