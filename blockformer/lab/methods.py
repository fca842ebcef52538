"""Uptraining methods compared at equal token budgets, each a conversion plus one or two `uptrain` phases.

Every method spends exactly the budget's tokens (whole optimizer steps of batch_size x seq_len); a staged method
splits them between its phases. The teacher, when there is one, is the vanilla model the block model came from.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..uptrain.checkpoints import checkpoint_dirs, latest_checkpoint
from ..uptrain.config import UptrainConfig
from .train import evaluate, load_checkpoint_weights

# layers frozen in the first phase of a staged schedule: every pretrained decoder layer, so only the embeddings,
# the embedder projection, the prefix expansion and the final norm move while they learn to feed those layers
FROZEN_LAYERS = ("block_decoder", "token_decoder.layers")


@dataclass(frozen=True)
class Method:
    init: str = "paper"               # convert --init
    layer_map: str = "partition"      # convert --layer-map
    kd: bool = False                  # distil from the vanilla model
    align: bool = False               # + block-decoder alignment to the teacher's split-layer states
    lora: bool = False
    staged: bool = False              # phase 1: decoder layers frozen; phase 2: everything
    progressive: tuple[int, ...] = ()  # block lengths of successive phases (re-blocked between them), last = lab's
    kd_weight: float | None = None    # None: the lab's kd_weight
    about: str = field(default="", compare=False)


METHODS = {
    "ce": Method(about="cross-entropy, full fine-tuning (the paper)"),
    "kd": Method(kd=True, about="distillation from the vanilla model (KD + CE, weight kd_weight)"),
    "kd_align": Method(kd=True, align=True, about="distillation + block-decoder alignment"),
    "lora": Method(lora=True, about="cross-entropy, LoRA on the decoder layers (new parts fully trained)"),
    "skip": Method(layer_map="skip", about="cross-entropy, layer map skip (both decoders: layers 0, 2, ...)"),
    "duplicate": Method(layer_map="duplicate", about="cross-entropy, layer map duplicate (both: every layer)"),
    "contextual": Method(init="contextual", about="contextual init (convert --init contextual), cross-entropy"),
    "contextual_kd": Method(init="contextual", kd=True, about="contextual init (convert --init contextual) + KD"),
    "contextual_kd_only": Method(init="contextual", kd=True, kd_weight=1.0,
                                 about="contextual init + pure distillation (no cross-entropy term)"),
    "staged": Method(staged=True, about="staged: decoder layers frozen for staged_share of the budget, then all; CE"),
    "staged_kd": Method(staged=True, kd=True, about="staged schedule + KD"),
    "progressive": Method(progressive=(1, 2, 4), about="progressive block length 1 -> 2 -> 4 (paper App. B.4), "
                          "a third of the budget each; CE"),
    "progressive_kd": Method(progressive=(1, 2, 4), kd=True, about="progressive block length + KD"),
}


def converted_name(m: Method) -> str:
    """The conversion a method starts from; a progressive one converts at its first block length."""
    return f"{m.init}-{m.layer_map}" + (f"-L{m.progressive[0]}" if m.progressive else "")


def budget_key(share: float) -> str:
    return f"b{share * 100:g}"


def phases(cfg, m: Method, tokens: int) -> list[tuple[int, tuple[str, ...]]]:
    """(tokens, frozen parts) per phase."""
    steps = tokens // cfg.step_tokens
    if m.progressive:  # equal shares of whole steps, the last phase taking the remainder; at least one step each
        n = len(m.progressive)  # LabConfig.check makes sure there are at least n steps
        return [((steps // n + (k == n - 1) * (steps % n)) * cfg.step_tokens, ()) for k in range(n)]
    if not m.staged or steps < 2:
        return [(tokens, ())]
    first = min(steps - 1, max(1, round(steps * cfg.staged_share)))
    return [(first * cfg.step_tokens, FROZEN_LAYERS), ((steps - first) * cfg.step_tokens, ())]


def uptrain_config(cfg, m: Method, model: str, out: Path, tokens: int, freeze, seed: int, max_docs: int,
                   curve: bool) -> UptrainConfig:
    steps = tokens // cfg.step_tokens
    every = max(1, steps // cfg.curve_points) if curve else max(1, steps // 3)
    teacher = str(cfg.out / "vanilla") if m.kd else None
    return UptrainConfig(
        model=model, data=str(cfg.out / "data" / "train.jsonl"), out=out, teacher=teacher,
        kd_weight=cfg.kd_weight if m.kd_weight is None else m.kd_weight, align_weight=cfg.align_weight if m.align else 0.0,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.uptrain_lr, warmup_steps=max(1, steps // 10),
        max_tokens=tokens, lora_rank=cfg.lora_rank if m.lora else 0, freeze=tuple(freeze), precision="fp32",
        eval_every=every, save_every=every, keep_last=10**6 if curve else 1, val_fraction=0.01, val_rows=4,
        seed=seed, max_docs=max_docs)


def run_uptrain(ucfg: UptrainConfig) -> None:
    """uptrain, resumed from its last checkpoint when a previous attempt was interrupted, skipped when done."""
    from ..uptrain.train import uptrain
    if (ucfg.out / "model" / "config.json").is_file() and (ucfg.out / "summary.json").is_file():
        return
    ucfg.resume = latest_checkpoint(ucfg.out) is not None
    ucfg.overwrite = not ucfg.resume
    uptrain(ucfg)


def run_method(cfg, name: str, share: float, seed: int, val: torch.Tensor, converted_loss: float,
               max_docs: int, curve: bool) -> dict:
    """Train one method at one budget and score it on the lab's validation rows."""
    import blockformer  # noqa: F401 - registers the block model type
    from transformers import AutoModelForCausalLM
    m = METHODS[name]
    tokens = cfg.budget_tokens(share)
    root = cfg.out / "uptrain" / f"{name}-{budget_key(share)}-s{seed}"
    model = str(cfg.out / "converted" / converted_name(m))
    points = [{"tokens": 0, "val_loss": converted_loss}]
    done = 0
    plan = phases(cfg, m, tokens)
    for k, (n, freeze) in enumerate(plan):
        out = root / f"phase{k + 1}" if len(plan) > 1 else root
        if k and m.progressive:  # the next block length, from the last phase's model
            model = reblocked(model, root / f"phase{k + 1}-start", m.progressive[k])
        # each phase its own seed: the same seed would re-read the previous phase's rows first
        run_uptrain(uptrain_config(cfg, m, model, out, n, freeze, seed + 7919 * k, max_docs, curve))
        if curve:
            points += curve_points(model, out, val, done)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished (and scored): only the model is kept
        model, done = str(out / "model"), done + n
    final = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    loss = evaluate(final, val)
    points.append({"tokens": tokens, "val_loss": loss})
    points = sorted({p["tokens"]: p for p in points}.values(), key=lambda p: p["tokens"])
    return {"method": name, "budget": share, "tokens": tokens, "seed": seed, "val_loss": loss, "curve": points,
            "about": m.about, "model": model}


def reblocked(model: str, dst: Path, block_length: int) -> str:
    from .progressive import reblock
    if not (dst / "config.json").is_file():
        reblock(model, dst, block_length)
    return str(dst)


def curve_points(model_dir: str, out: Path, val: torch.Tensor, offset: int) -> list[dict]:
    """Validation loss of every checkpoint a run kept (weights read from safetensors into the start model)."""
    from transformers import AutoModelForCausalLM
    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pts = []
    for ckpt in reversed(checkpoint_dirs(out)):
        state = load_checkpoint_weights(net, ckpt)
        pts.append({"tokens": offset + state["tokens"], "val_loss": evaluate(net, val)})
    return pts


def max_docs_for(cfg, doc_tokens: list[int], tokens: int) -> int:
    """Documents uptrain must read for `tokens` training tokens plus its 1% validation slice, with a margin."""
    need, total = math.ceil(tokens * 1.15 / 0.99) + 4 * cfg.seq_len, 0
    for i, n in enumerate(doc_tokens):
        total += n
        if total >= need:
            return i + 1
    return len(doc_tokens)
