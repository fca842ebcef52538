"""Uptrain a converted Block Transformer: cross-entropy and/or distillation from the original, full or LoRA.

    blockformer uptrain out/smollm2-block --data corpus/gutenberg --teacher default \\
        --max-time 5m --out runs/uptrain
    blockformer uptrain out/tiny-block --data notes.txt --max-steps 4 --seq-len 32 --batch-size 2 --out runs/tiny
    accelerate launch --num_processes 2 -m blockformer.cli uptrain ...     # DDP; see README for FSDP

Checkpoints (`OUT/checkpoints/step-N`, see checkpoints.py) hold model, optimizer, RNG and data position; `--resume`
continues so that the logged losses are those of an uninterrupted run. The result is `OUT/model`, a plain model
folder. Non-finite losses, gradients or weights stop the run before the update that would spread them, and a
checkpoint is written only when its weights and validation loss are finite.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import sources
from ..errors import BlockformerError
from ..io import atomic_folder, atomic_write_text, check_not_input
from ..machine import cpu_flags
from ..model import output_head, prediction_slots
from .checkpoints import RunFolder, gather_state, is_fsdp, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import UptrainConfig, data_specs, step_budget
from .data import pack, read_documents
from .losses import Guide, alignment_loss, block_start_weights, layerwise_state_loss, predicting, token_loss

__all__ = ["UptrainConfig", "uptrain", "latest_checkpoint"]


def validate(cfg: UptrainConfig, block_length: int) -> int:
    if cfg.seq_len % block_length:
        fixed = math.ceil(cfg.seq_len / block_length) * block_length
        print(f"note: --seq-len {cfg.seq_len} rounded up to {fixed}, a multiple of the block length {block_length}")
        return fixed
    return cfg.seq_len


def check_out(cfg: UptrainConfig) -> None:
    check_not_input(cfg.out, [cfg.model, cfg.teacher, *data_specs(cfg.data)])
    if cfg.out.exists() and not (cfg.resume or cfg.overwrite):
        raise BlockformerError(f"{cfg.out} already exists; pass --resume to continue it or --overwrite to replace it")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise BlockformerError(f"{cfg.out} exists and is not a folder")
    if cfg.resume and not latest_checkpoint(cfg.out):
        raise BlockformerError(f"--resume: no checkpoint in {cfg.out / 'checkpoints'}")


def uptrain(cfg: UptrainConfig) -> dict:
    from accelerate import Accelerator
    cfg.out = Path(cfg.out)
    cfg.check()
    check_out(cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())  # on CPU, several processes use gloo
    folder = RunFolder(cfg.out, fresh=not cfg.resume, main=acc.is_main_process)  # fails early if not writable
    try:
        state = _uptrain(cfg, acc, folder)
    except BaseException:
        folder.discard()  # a fresh run that failed before its first checkpoint leaves nothing behind
        raise
    acc.wait_for_everyone()
    return state


def _uptrain(cfg: UptrainConfig, acc, folder: RunFolder) -> dict:
    src = sources.resolve(cfg.model)
    model, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    if model.config.model_type != "block_transformer":
        raise BlockformerError(f"{cfg.model} is not a Block Transformer folder; convert it first")
    cfg.seq_len = validate(cfg, model.config.block_length)
    guide = Guide.build(cfg, model, load_teacher(cfg, tok) if cfg.teacher else None)
    docs = [d for spec in data_specs(cfg.data) for d in read_documents(spec, cfg.text_field, cfg.split, cfg.max_docs)]
    data = pack(docs, tok, cfg.seq_len, model.config.block_length, cfg.val_fraction, cfg.seed)
    model = prepare_trainable(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    folder.check_space(sum(p.numel() * p.element_size() for p in model.parameters())
                       + sum(2 * p.numel() * 4 for p in trainable))  # weights + AdamW moments
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "history": []}
    if cfg.resume:
        state = load_checkpoint(cfg.out, acc, model, opt)
    if acc.is_main_process:
        atomic_write_text(folder.path / "uptrain_config.json",
                          json.dumps({**asdict(cfg), "out": str(cfg.out)}, indent=2) + "\n")
    try:
        loop(cfg, acc, model, guide, opt, data, state, folder)
    finally:
        guide.close()
    write_final(cfg, acc, model, tok, data, state, folder)
    return state


def load_teacher(cfg: UptrainConfig, tok):
    src = sources.resolve(cfg.teacher)
    if sources.load_tokenizer(src).get_vocab() != tok.get_vocab():
        raise BlockformerError(f"the teacher {cfg.teacher} has a different tokenizer than the student")
    teacher = sources.load_model(src, torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def prepare_trainable(model, cfg: UptrainConfig):
    """Full fine-tuning, or LoRA on the decoder linears with the new parts fully trainable; optional freezing."""
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=r".*(decoder|embedder\.local)\.layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))")
        model = get_peft_model(model, lcfg)
        for name, p in model.named_parameters():
            if any(part in name for part in ("embedder.proj", "embedder.sink", "token_decoder.expand",
                                                       "token_decoder.bridge")):
                p.requires_grad_(True)  # the new parts have no pretrained value: train them fully
    for part in cfg.freeze:
        hit = [p for name, p in model.named_parameters() if f"{part}." in name]
        if not hit:
            raise BlockformerError(f"freeze (--freeze): '{part}' names no part of this model")
        for p in hit:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise BlockformerError("nothing left to train: --freeze covers every part")
    return model.train()


def autocast(cfg: UptrainConfig, device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (device.type == "cuda" or _cpu_bf16()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _cpu_bf16() -> bool:
    """bf16 autocast on a CPU pays only with AMX tiles. AVX512-BF16 alone was slower than fp32 here (Xeon, 2 cores:
    full step 196 vs 261 tokens/s, teacher forward 1.82 vs 0.95 s; `bench/uptrain_speed.py --precisions fp32,bf16`),
    so `auto` keeps fp32 there; `--precision bf16` still forces it."""
    return "amx_bf16" in cpu_flags()


def progress(cfg: UptrainConfig, state: dict) -> float:
    """Fraction of the budget used: the largest of steps, tokens and (training) time."""
    parts = [state["step"] / cfg.max_steps if cfg.max_steps else 0,
             state["tokens"] / cfg.max_tokens if cfg.max_tokens else 0,
             state["train_seconds"] / cfg.max_time if cfg.max_time else 0]
    return max(parts)


def lr_factor(cfg: UptrainConfig, state: dict) -> float:
    if state["step"] < cfg.warmup_steps:
        return (state["step"] + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(progress(cfg, state), 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos


def rows_for_step(step: int, global_batch: int, n_train: int, seed: int) -> list[int]:
    """Deterministic data position: epoch permutations seeded by (seed, epoch)."""
    out = []
    for k in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(k, n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out.append(int(perm[i]))
    return out


def all_max(acc, value: float) -> float:
    """The largest value over processes: every process then takes the same decision (stop, diverged)."""
    if acc.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def finite_params(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def loop(cfg, acc, model, guide, opt, data, state, folder):
    world, rank = acc.num_processes, acc.process_index
    gb = cfg.batch_size * cfg.grad_accum * world
    device = acc.device
    if guide.model is not None:
        guide.model.to(device)
    bar = tqdm(total=step_budget(cfg.max_steps, cfg.max_tokens, gb * cfg.seq_len), initial=state["step"], disable=not acc.is_main_process,
               unit="step")
    t_start = time.perf_counter() - state["train_seconds"]
    params = [p for p in model.parameters() if p.requires_grad]
    while progress(cfg, state) < 1.0:
        t0 = time.perf_counter()
        rows = rows_for_step(state["step"], gb, data.n_train, cfg.seed)
        mine = rows[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        loss_sum, count = step_losses(cfg, acc, model, guide, data, mine, gb, device)
        check_update(cfg, acc, model, params, folder, loss_sum / max(count, 1), state["step"] + 1)
        # fault injection for tests: a learning-rate spike that makes the weights diverge at step N
        spike = 1e30 if os.environ.get("BLOCKFORMER_LR_SPIKE_AT_STEP") == str(state["step"] + 1) else 1.0
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, state) * spike
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += gb * cfg.seq_len
        # the slowest clock decides for everyone: processes that stopped at different steps would hang DDP
        state["train_seconds"] = all_max(acc, time.perf_counter() - t_start)
        rec = {"step": state["step"], "loss": loss_sum / max(count, 1), "lr": opt.param_groups[0]["lr"],
               "tokens": state["tokens"], "tokens_per_s": gb * cfg.seq_len / (time.perf_counter() - t0),
               "seconds": round(state["train_seconds"], 2)}
        save = state["step"] % cfg.save_every == 0
        if save or state["step"] % cfg.eval_every == 0 or progress(cfg, state) >= 1.0:
            rec["val_loss"] = validation_loss(acc, model, data, cfg, device)
            rec["val_ppl"] = math.exp(min(rec["val_loss"], 700.0))  # 700: exp would overflow a float
            check_finite(cfg, acc, model, folder, rec)
        state["history"].append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **(
            {"val_ppl": f"{rec['val_ppl']:.1f}"} if "val_ppl" in rec else {}))
        if acc.is_main_process:
            append_metrics(folder, rec)
        if save:
            checkpoint(cfg, acc, model, opt, state, folder)
        acc.wait_for_everyone()
        if os.environ.get("BLOCKFORMER_CRASH_AFTER_STEP") == str(state["step"]):  # fault injection for tests
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def check_update(cfg, acc, model, params, folder, loss: float, step: int) -> None:
    """Before an update: the loss, the gradient norm and the weights must be finite, on every process."""
    # grad_clip 0: an infinite bound still returns the norm and leaves the gradients as they are
    norm = float(acc.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
    problems = [f"the {k} is {v}" for k, v in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(v)]
    if not problems and not finite_params(model):
        problems = ["a weight is not finite"]
    if all_max(acc, float(bool(problems))):
        raise diverged(cfg, folder, f"{'; '.join(problems) or 'another process saw a non-finite value'} at step "
                                    f"{step}; stopped before its update")


def check_finite(cfg, acc, model, folder, rec) -> None:
    """Before a checkpoint or the final model: the weights and the validation loss must be finite."""
    if all_max(acc, float(not (math.isfinite(rec["val_loss"]) and finite_params(model)))):
        raise diverged(cfg, folder, f"the update of step {rec['step']} made the model diverge (validation loss "
                                    f"{rec['val_loss']}); stopped without saving it")


def diverged(cfg, folder: RunFolder, what: str) -> BlockformerError:
    last = latest_checkpoint(cfg.out) if folder.published else None
    lower = f"{cfg.lr / 10:g}"
    if last:
        return BlockformerError(f"{what}. The last finite checkpoint is {last}; continue from it with a lower "
                                f"learning rate: the same command with --resume --lr {lower}")
    return BlockformerError(f"{what}. No checkpoint was saved before; start again with a lower learning rate "
                            f"(e.g. --lr {lower})")


def append_metrics(folder: RunFolder, rec: dict) -> None:
    try:
        with open(folder.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        raise BlockformerError(f"could not append to {folder.out / 'metrics.jsonl'}: {e.strerror or e}") from e


def checkpoint(cfg, acc, model, opt, state, folder: RunFolder) -> None:
    model_sd, opt_sd = gather_state(acc, model, opt)  # every process: a collective under FSDP
    if acc.is_main_process:
        try:
            save_checkpoint(folder.path, model_sd, opt_sd, state, cfg.keep_last)
        except (OSError, BlockformerError) as e:  # io turns a full or read-only disk into BlockformerError
            last = latest_checkpoint(folder.path)
            what = (f"could not write checkpoint step-{state['step']} in {folder.out / 'checkpoints'}: "
                    f"{e.strerror or e}" if isinstance(e, OSError) else str(e))
            raise BlockformerError(f"{what}; " + (f"the previous checkpoint {last.name} is kept" if last else
                                                   "there is no earlier checkpoint")) from e
        folder.publish()  # a fresh run replaces OUT once it has something to resume from
    del model_sd, opt_sd


def step_losses(cfg, acc, model, guide, data, mine, gb, device):
    """Forward/backward over this process's micro-batches; the loss is a token mean over the global batch."""
    micro = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    batches = [tuple(t.to(device) for t in zip_rows(data, m)) for m in micro]
    n_tok = torch.tensor(sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in batches), device=device)
    n_tok = acc.reduce(n_tok, "sum").item() if acc.num_processes > 1 else n_tok.item()
    total = 0.0
    for ids, mask, labels in batches:
        with autocast(cfg, device):
            loss, _ = micro_loss(cfg, acc, model, guide, ids, mask, labels)
        # DDP averages gradients over processes; scale so that the result is the global token mean
        acc.backward(loss * acc.num_processes / n_tok)
        total += loss.item()
    total = torch.tensor(total, device=device)
    total = acc.reduce(total, "sum").item() if acc.num_processes > 1 else total.item()
    return total, n_tok


def zip_rows(data, rows):
    got = [data.train(i) for i in rows]
    return (torch.stack([g[k] for g in got]) for k in range(3))


def micro_loss(cfg, acc, model, guide: Guide, ids, mask, labels):
    out = model(ids, attention_mask=mask, return_hidden=True)
    h, ctx, shift = out.hidden_states
    conf = acc.unwrap_model(model).config
    head = output_head(acc.unwrap_model(model))
    t_pair = None
    if guide.model is not None:
        with torch.no_grad():
            t_out = guide.model.base_model(input_ids=ids, attention_mask=mask.long())
        t_pair = (t_out.last_hidden_state, output_head(guide.model))
    weight = (block_start_weights(ids.shape[1], shift, conf.block_length, cfg.block_start_weight)
              if cfg.block_start_weight != 1 else None)
    loss, n = token_loss(h, labels, head, t_pair, cfg.temperature, cfg.kd_weight if guide.model is not None else 0.0,
                         weight=weight)
    if guide.align is not None:
        a, m = alignment_loss(ctx, shift, guide.align.take(), mask, conf.block_length)
        loss = loss + cfg.align_weight * a * n / max(m, 1)
    if guide.upper is not None:
        idx = prediction_slots(ids.shape[1], shift, conf.block_length)
        s = layerwise_state_loss(guide.student.take(), guide.upper.take(), idx, predicting(labels), conf.prefix_length)
        loss = loss + cfg.hidden_weight * s
    return loss, n


@torch.no_grad()
def validation_loss(acc, model, data, cfg, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(data.n_val, cfg.val_rows), cfg.batch_size):
        ids, mask, labels = (t[i:i + cfg.batch_size].to(device) for t in (data.ids, data.mask, data.labels))
        with autocast(cfg, device):
            h = model(ids, attention_mask=mask, return_hidden=True).hidden_states[0]
            loss, n = token_loss(h, labels, output_head(acc.unwrap_model(model)))
        total, count = total + loss.item(), count + n
    model.train()
    return total / max(count, 1)


def final_model(cfg, acc, model):
    """The trained model as one plain module on the main process (None elsewhere). Under FSDP the shards are
    gathered (a collective) and loaded into a fresh copy, since the wrapped parameters are only this rank's part."""
    if not is_fsdp(acc):
        return acc.unwrap_model(model) if acc.is_main_process else None
    sd = acc.get_state_dict(model)
    if not acc.is_main_process:
        return None
    copy = prepare_trainable(sources.load_model(sources.resolve(cfg.model), torch.float32), cfg)
    copy.load_state_dict(sd)
    return copy


def write_final(cfg, acc, model, tok, data, state, folder: RunFolder) -> None:
    from .report import loss_curve
    model = final_model(cfg, acc, model)
    if not acc.is_main_process:
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded in: the result loads without peft
    with atomic_folder(folder.path / "model", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"# Uptrained Block Transformer\n\nFrom `{cfg.model}` on "
                                       f"{' + '.join(f'`{d}`' for d in data_specs(cfg.data))}: "
                                       f"{state['step']} steps, {state['tokens']:,} tokens, teacher "
                                       f"`{cfg.teacher}`, {'LoRA r=' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}"
                                       f" fine-tuning. See `uptrain_config.json` and `metrics.jsonl` beside it.\n")
    loss_curve(state["history"], folder.path / "loss.png")
    summary = {"steps": state["step"], "tokens": state["tokens"], "seconds": round(state["train_seconds"], 1),
               "documents": data.documents, "data_tokens": data.tokens,
               "final": state["history"][-1] if state["history"] else None}
    atomic_write_text(folder.path / "summary.json", json.dumps(summary, indent=2) + "\n")
    folder.publish()
