"""Checkpoints and the run folder. Tensors go to safetensors, everything else to JSON: nothing is ever unpickled, so
a file planted in a run folder cannot run code. A checkpoint is complete only when `state.json` (written last,
with the size of every tensor file) matches its files; a truncated newest checkpoint falls back to the previous one.

    OUT/checkpoints/step-N/model.safetensors      model state dict (tied weights stored once)
                          /optimizer.safetensors  optimizer tensors, flattened as state/<param>/<name>
                          /rng.safetensors        torch (and CUDA) RNG states, uint8 tensors
                          /state.json             step, tokens, history, python RNG, optimizer param groups, sizes
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import BlockformerError
from ..io import atomic_folder, remove_stale_temps

TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
FORMAT = 1


# ----------------------------------------------------------------------------------------------- finding
def checkpoint_dirs(out: Path) -> list[Path]:
    """`step-N` folders, newest first (hidden temporaries and other names are ignored)."""
    found = [p for p in (Path(out) / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def readable(path: Path) -> bool:
    """Complete and parseable: state.json lists every tensor file with its size, and their headers open."""
    try:
        meta = json.loads((path / "state.json").read_text())
        for name in TENSOR_FILES:
            if (path / name).stat().st_size != meta["files"][name]:
                return False
            with safe_open(path / name, "pt"):
                pass
        return meta.get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any damage (short file, bad JSON, missing key) means: not usable
        return False


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    return next((p for p in checkpoint_dirs(out) if readable(p)), None)


# ----------------------------------------------------------------------------------------------- gathering
def is_fsdp(acc) -> bool:
    return getattr(acc.distributed_type, "name", str(acc.distributed_type)).endswith("FSDP")


def gather_state(acc, model, opt) -> tuple[dict, dict]:
    """Full model and optimizer state dicts. Under FSDP this gathers the shards, a collective: every process must
    call it (only the main process then writes)."""
    sd = acc.get_state_dict(model)
    if is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        osd = get_optimizer_state_dict(model, getattr(opt, "optimizer", opt),
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        osd = opt.state_dict()
    return sd, osd


def apply_state(acc, model, opt, sd: dict, osd: dict) -> None:
    if is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, sd, options=opts)
        set_optimizer_state_dict(model, getattr(opt, "optimizer", opt), osd, options=opts)
    else:
        acc.unwrap_model(model).load_state_dict(sd)
        opt.load_state_dict(osd)


# ----------------------------------------------------------------------------------------------- flattening
def _dedupe(sd: dict) -> tuple[dict, dict]:
    """safetensors refuses shared tensors: store tied weights once and record the other names as aliases."""
    seen, tensors, aliases = {}, {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride())) if v.numel() else None
        if key in seen:
            aliases[k] = seen[key]
            continue
        if key:
            seen[key] = k
        tensors[k] = v.detach().cpu().contiguous()
    return tensors, aliases


def _flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, entry in osd["state"].items():
        for name, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"state/{pid}/{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    keys = [str(k) for k in osd["state"]]
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars, "keys": keys,
                     "int_keys": all(isinstance(k, int) for k in osd["state"])}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {k: dict(meta["scalars"].get(k, {})) for k in meta["keys"]}
    for key, v in tensors.items():
        _, pid, name = key.split("/", 2)
        state[pid][name] = v
    if meta["int_keys"]:
        state = {int(k): v for k, v in state.items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------- save / load
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Path, model_sd: dict, opt_sd: dict, state: dict, keep_last: int) -> Path:
    """Write `run/checkpoints/step-N` atomically and durably (files fsynced before the rename), then prune."""
    ckpt = run / "checkpoints" / f"step-{state['step']}"
    model_t, aliases = _dedupe(model_sd)
    opt_t, opt_meta = _flatten_optimizer(opt_sd)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_folder(ckpt, overwrite=True) as tmp:
        for name, tensors in zip(TENSOR_FILES, (model_t, opt_t, rng)):
            save_file(tensors, tmp / name)
            _fsync(tmp / name)
        meta = {"format": FORMAT, "state": state, "model_aliases": aliases, "optimizer": opt_meta,
                "python_rng": random.getstate(), "files": {n: (tmp / n).stat().st_size for n in TENSOR_FILES}}
        (tmp / "state.json").write_text(json.dumps(meta))
        _fsync(tmp / "state.json")
    _fsync(ckpt.parent)  # the rename itself
    for old in checkpoint_dirs(run)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state dict, optimizer state dict, meta) of one checkpoint; raises on any damage."""
    meta = json.loads((path / "state.json").read_text())
    sd = load_file(path / "model.safetensors")
    for alias, name in meta["model_aliases"].items():
        sd[alias] = sd[name]
    osd = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
    meta["rng"] = load_file(path / "rng.safetensors")
    return sd, osd, meta


def load_checkpoint(out: Path, acc, model, opt) -> dict:
    """Restore the newest checkpoint that reads back whole (a damaged newer one is skipped with a note)."""
    for path in checkpoint_dirs(out):
        try:
            if not readable(path):
                raise ValueError("incomplete")
            sd, osd, meta = read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - damaged: fall back to the previous checkpoint
            print(f"note: checkpoint {path} is damaged or incomplete ({type(e).__name__}); trying an older one")
            continue
        apply_state(acc, model, opt, sd, osd)
        torch.set_rng_state(meta["rng"]["torch"])
        cuda = [meta["rng"][k] for k in sorted(meta["rng"]) if k.startswith("cuda/")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        if acc.is_main_process:
            trim_metrics(Path(out) / "metrics.jsonl", meta["state"]["step"])
        acc.wait_for_everyone()
        return meta["state"]
    raise BlockformerError(f"--resume: no readable checkpoint in {Path(out) / 'checkpoints'}")


def trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint by the interrupted run, and a last line cut short by a kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- run folder
class RunFolder:
    """Where a run writes. A fresh run is written in a hidden sibling of OUT that replaces OUT only once the run
    has its first checkpoint (or finishes): a run that fails before then leaves OUT as it was and nothing beside
    it. A resumed run writes in OUT itself. Only the main process touches the disk."""

    def __init__(self, out: Path, fresh: bool, main: bool):
        self.out, self.main, self.published = Path(out), main, not fresh
        self.path = self.out if not fresh else self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if not main:
            return
        try:
            if fresh:
                remove_stale_temps(self.out)  # what a run killed before its first checkpoint left
                self.out.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir()
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"\0" * 4096)  # an empty file can be created on a full disk; data cannot
            _fsync(probe)
            probe.unlink()
        except OSError as e:
            self.discard()
            raise BlockformerError(f"cannot write the run folder {self.out}: {e.strerror or e}") from e

    def check_space(self, need: int) -> None:
        if self.main and shutil.disk_usage(self.path).free < need:
            free = shutil.disk_usage(self.path).free
            raise BlockformerError(f"{self.out}: {free / 2**20:.0f} MiB free on its disk, but a checkpoint needs "
                                   f"about {need / 2**20:.0f} MiB")

    def publish(self) -> None:
        """Put the fresh run in place of OUT (an old run there is removed only now)."""
        if self.published or not self.main:
            self.published = True
            return
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            self.out.rename(old)
        self.path.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        self.path, self.published = self.out, True

    def discard(self) -> None:
        if self.main and not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
