"""The lab's own pieces of training: the vanilla model, the from-scratch block model, a plain AdamW loop for
pretraining both (same rows, same order, same schedule), and the one validation score every model gets."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..uptrain.checkpoints import latest_checkpoint, read_checkpoint, save_checkpoint


def vanilla_model(cfg, tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(cfg.seed)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       max_position_embeddings=2 * cfg.seq_len, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(conf)


def scratch_block_model(converted: Path, seed: int):
    """A Block Transformer with the converted model's exact shape, randomly initialised (the paper's init for the
    embedder projection and expansion, as any fresh model gets)."""
    from ..model import BlockTransformerConfig, BlockTransformerForCausalLM
    conf = BlockTransformerConfig.from_pretrained(converted)
    conf.provenance = {**conf.provenance, "init": {"init": "random (trained from scratch)"}}
    torch.manual_seed(seed)
    return BlockTransformerForCausalLM(conf)


def lm_loss(model, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over positions 1..T-1 of each row. Block models anchor the first token, so their
    `logits[:, t]` predicts token t+1 exactly as a vanilla model's: the same positions are scored for both."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch: int = 16) -> float:
    """Mean NLL per predicted token over the validation rows."""
    was_training = model.training
    model.eval()
    total = sum(lm_loss(model, val[i:i + batch], "sum").item() for i in range(0, val.shape[0], batch))
    model.train(was_training)
    return total / (val.shape[0] * (val.shape[1] - 1))


def row_order(step: int, batch: int, n_rows: int, seed: int) -> list[int]:
    """Rows of one step: the training rows in a fresh permutation per epoch, seeded (same for every model)."""
    out = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(k, n_rows)
        out.append(int(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))[i]))
    return out


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def curve_steps(steps: int, points: int) -> list[int]:
    """Evaluation steps spaced evenly on a log scale from 1% of the run to its end: the figure's token axis is
    logarithmic, and the uptraining budgets (1% to 10% of N) fall in the first part of it."""
    ratio = 100 ** (1 / max(1, points - 1))
    return sorted({max(1, round(steps / ratio ** k)) for k in range(points)})


def pretrain(model, train_rows: torch.Tensor, val: torch.Tensor, cfg, run: Path, desc: str) -> dict:
    """AdamW from scratch for cfg.tokens tokens; validation at `curve_points` steps (curve_steps). Checkpoints (safetensors,
    via uptrain's writer) at every curve point and every 5% of the run (the curve points are log-spaced, a third of
    the run apart at its end), so an interrupted hour of pretraining resumes close to where it stopped."""
    steps, batch = cfg.pretrain_steps, cfg.batch_size
    eval_at, save_every = curve_steps(steps, cfg.curve_points), max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"step": 0, "history": []}
    last = latest_checkpoint(run)
    if last is not None:
        sd, osd, meta = read_checkpoint(last)
        model.load_state_dict(sd)
        opt.load_state_dict(osd)
        state = meta["state"]
    model.train()
    bar = tqdm(total=steps, initial=state["step"], desc=desc, unit="step")
    while state["step"] < steps:
        ids = train_rows[row_order(state["step"], batch, train_rows.shape[0], cfg.seed)]
        loss = lm_loss(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], steps, cfg.lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        if state["step"] in eval_at:
            state["history"].append({"step": state["step"], "tokens": state["step"] * cfg.step_tokens,
                                     "train_loss": loss.item(), "val_loss": evaluate(model, val)})
            bar.set_postfix(val_loss=f"{state['history'][-1]['val_loss']:.3f}")
        if state["step"] < steps and (state["step"] in eval_at or state["step"] % save_every == 0):
            save_checkpoint(run, model.state_dict(), opt.state_dict(), state, keep_last=1)
    bar.close()
    return state


def load_checkpoint_weights(model, ckpt: Path):
    """The model weights of one uptrain checkpoint (safetensors + JSON only: nothing unpickled)."""
    sd, _, meta = read_checkpoint(ckpt)
    model.load_state_dict(sd)
    return meta["state"]
