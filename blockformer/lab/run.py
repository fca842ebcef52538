"""The lab's stages, in order. Each writes OUT/stages/NAME.json when it is complete and is skipped when that file
is there, so an interrupted lab resumes where it stopped (pretraining and uptraining also resume inside a stage,
from their checkpoints). The report (lab.json, fig5a.png, methods.md) is rebuilt from the stage files every time.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BlockformerError
from ..io import atomic_folder, atomic_write_text
from .config import LabConfig
from .data import encode, rows, split_corpus, train_tokenizer, write_split
from .methods import METHODS, budget_key, converted_name, max_docs_for, run_method
from .train import evaluate, pretrain, scratch_block_model, vanilla_model


def default_threads() -> int:
    """The cores not already busy: on a shared machine, extra threads only fight over the same cores."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


class Lab:
    def __init__(self, cfg: LabConfig):
        self.cfg, self.status = cfg, {}
        self._val = self._train = self._lengths = None

    # ------------------------------------------------------------------------------------------ bookkeeping
    def stage(self, name: str, fn) -> dict:
        path = self.cfg.out / "stages" / f"{name}.json"
        if path.is_file():
            self.status[name] = "skipped"
            print(f"[lab] {name}: done before, skipped", flush=True)
            return json.loads(path.read_text())
        print(f"[lab] {name}: running ({len(self.status) + 1} of {self.total})", flush=True)
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        self.status[name] = "ran"
        return result

    def check_folder(self) -> None:
        """A folder of another kind is never written into; one made with other options is not mixed with them.
        Methods, budgets and seeds only add or leave out uptraining stages (each its own file), so a finished lab
        can be extended with more of them; every other option shapes the shared stages and must match."""
        out, mine = self.cfg.out, self.cfg.out / "lab_config.json"
        options = json.dumps({**asdict(self.cfg), "out": None, "threads": None}, indent=2, default=list)
        if mine.is_file():
            if _shared(json.loads(mine.read_text())) != _shared(json.loads(options)):
                raise BlockformerError(f"{out} holds a lab run made with other options; use another --out or "
                                       f"remove that folder")
            return
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BlockformerError(f"{out} exists and is not a lab folder; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mine, options + "\n")

    # ------------------------------------------------------------------------------------------ data
    @property
    def data(self) -> Path:
        return self.cfg.out / "data"

    def data_stage(self) -> dict:
        cfg = self.cfg
        train, val = split_corpus(cfg)
        write_split(self.data, train, val)
        tok = train_tokenizer(train, cfg.vocab_size)
        with atomic_folder(self.data / "tokenizer", overwrite=True) as tmp:
            tok.save_pretrained(tmp)
        enc = encode(tok, train)
        val_rows = rows(encode(tok, val), cfg.seq_len, cfg.val_rows)
        if val_rows.shape[0] < 1:
            raise BlockformerError(f"the validation text holds less than one row of {cfg.seq_len} tokens")
        save_file({"ids": torch.tensor([t for ids in enc for t in ids]),
                   "lengths": torch.tensor([len(ids) for ids in enc])}, self.data / "train_ids.safetensors")
        save_file({"rows": val_rows}, self.data / "val_rows.safetensors")
        return {"train_documents": len(train), "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val)),
                "train_tokens": sum(map(len, enc)), "val_rows": int(val_rows.shape[0]), "vocab_size": len(tok)}

    def val(self) -> torch.Tensor:
        if self._val is None:
            self._val = load_file(self.data / "val_rows.safetensors")["rows"]
        return self._val

    def train_rows(self) -> torch.Tensor:
        if self._train is None:
            t = load_file(self.data / "train_ids.safetensors")
            self._train, self._lengths = rows([t["ids"].tolist()], self.cfg.seq_len), t["lengths"].tolist()
        return self._train

    def doc_lengths(self) -> list[int]:
        self.train_rows()
        return self._lengths

    # ------------------------------------------------------------------------------------------ models
    def pretrain_stage(self, name: str, model) -> dict:
        """Pretrain `model` for N tokens on the shared rows; save it with the tokenizer as OUT/NAME."""
        from transformers import AutoTokenizer
        cfg, run = self.cfg, self.cfg.out / f"pretrain-{name}"
        run.mkdir(parents=True, exist_ok=True)
        t0, start = time.perf_counter(), _steps_done(run)
        state = pretrain(model, self.train_rows(), self.val(), cfg, run, name)
        seconds = time.perf_counter() - t0
        with atomic_folder(cfg.out / name, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(self.data / "tokenizer").save_pretrained(tmp)
        shutil.rmtree(run, ignore_errors=True)  # its checkpoints only served to resume this stage
        return {"val_loss": evaluate(model, self.val()), "curve": state["history"], "tokens": cfg.pretrain_steps *
                cfg.step_tokens, "parameters": sum(p.numel() for p in model.parameters()),
                "tokens_per_s": round((cfg.pretrain_steps - start) * cfg.step_tokens / seconds, 1)}

    def vanilla_stage(self) -> dict:
        from transformers import AutoTokenizer
        return self.pretrain_stage("vanilla", vanilla_model(self.cfg, AutoTokenizer.from_pretrained(
            self.data / "tokenizer")))

    def convert_stage(self, name: str) -> dict:
        from transformers import AutoModelForCausalLM
        from ..convert import ConvertConfig, convert
        cfg = self.cfg
        init, layer_map, *length = name.split("-")  # progressive methods start at another block length: -L1
        out = cfg.out / "converted" / name
        block_length = int(length[0][1:]) if length else cfg.block_length
        convert(ConvertConfig(str(cfg.out / "vanilla"), out, block_length=block_length,
                              prefix_length=cfg.prefix_length, layer_map=layer_map, init=init,
                              calib_data=str(self.data / "train.jsonl"), calib_tokens=cfg.calib_tokens,
                              overwrite=True))
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        return {"val_loss": evaluate(model, self.val()), "parameters": sum(p.numel() for p in model.parameters())}

    # ------------------------------------------------------------------------------------------ the plan
    def plan(self) -> list[tuple[str, float, int]]:
        low = min(self.cfg.budgets)
        return [(m, b, s) for m in self.cfg.methods for b in self.cfg.budgets
                for s in (range(self.cfg.seed, self.cfg.seed + self.cfg.seeds) if b == low else [self.cfg.seed])]

    def run(self) -> dict:
        cfg = self.cfg
        conversions = sorted({"paper-partition"} | {converted_name(METHODS[m]) for m in cfg.methods})
        plan = self.plan()
        self.total = 3 + len(conversions) + len(plan)
        results = {"data": self.stage("data", self.data_stage), "vanilla": self.stage("vanilla", self.vanilla_stage)}
        results["converted"] = {c: self.stage(f"convert-{c}", lambda c=c: self.convert_stage(c)) for c in conversions}
        results["scratch"] = self.stage("scratch", lambda: self.pretrain_stage(
            "scratch", scratch_block_model(cfg.out / "converted" / "paper-partition", cfg.seed)))
        results["runs"] = []
        for m, b, s in plan:
            start = results["converted"][converted_name(METHODS[m])]["val_loss"]
            run = lambda m=m, b=b, s=s, start=start: run_method(  # noqa: E731
                cfg, m, b, s, self.val(), start, max_docs_for(cfg, self.doc_lengths(), cfg.budget_tokens(b)),
                curve=(m == "ce" and s == cfg.seed))
            results["runs"].append(self.stage(f"up-{m}-{budget_key(b)}-s{s}", run))
        return results


EXTENDABLE = ("methods", "budgets", "seeds")  # options that only choose which uptraining stages run


def _shared(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in EXTENDABLE}


def _steps_done(run: Path) -> int:
    from ..uptrain.checkpoints import latest_checkpoint
    last = latest_checkpoint(run)
    return int(json.loads((last / "state.json").read_text())["state"]["step"]) if last else 0


def run_lab(cfg: LabConfig) -> dict:
    """Run (or resume) the whole lab; returns the report dict also written as OUT/lab.json."""
    from .report import write_report
    cfg.out = Path(cfg.out)
    cfg.check()
    torch.set_num_threads(cfg.threads or default_threads())
    from transformers.utils import logging
    logging.disable_progress_bar()  # one bar per weight load would bury the lab's own progress bars
    lab = Lab(cfg)
    lab.check_folder()
    t0 = time.perf_counter()
    results = lab.run()
    return write_report(cfg, results, lab.status, time.perf_counter() - t0)
