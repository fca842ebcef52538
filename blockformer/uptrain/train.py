"""Uptrain a converted Block Transformer: cross-entropy and/or distillation from the original, full or LoRA.

    blockformer uptrain out/smollm2-block --data ../shared/data/corpus/gutenberg --teacher default \\
        --max-time 5m --out runs/uptrain
    blockformer uptrain out/tiny-block --data notes.txt --max-steps 4 --seq-len 32 --batch-size 2 --out runs/tiny
    accelerate launch --num_processes 2 -m blockformer.cli uptrain ...     # DDP; see README for FSDP

Checkpoints (`OUT/checkpoints/step-N`) hold model, optimizer, scheduler, RNG and data position; `--resume` continues
so that the logged losses are those of an uninterrupted run. The result is `OUT/model`, a plain model folder.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import sources
from ..errors import BlockformerError
from ..io import atomic_folder
from .data import pack, read_documents
from .losses import alignment_loss, token_loss


@dataclass
class UptrainConfig:
    model: str
    data: str
    out: Path
    teacher: str | None = None
    kd_weight: float = 0.5          # with a teacher: loss = (1 - w) CE + w KD
    temperature: float = 1.0
    align_weight: float = 0.0
    text_field: str = "text"
    split: str = "train"
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None   # seconds
    lora_rank: int = 0              # 0: full fine-tuning
    lora_alpha: int = 16
    freeze: tuple[str, ...] = ()
    precision: str = "auto"         # auto | bf16 | fp32
    eval_every: int = 50
    val_fraction: float = 0.05
    val_rows: int = 32              # validation rows scored each time (a fixed subset of the held-out slice)
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    max_docs: int | None = None     # documents read at most (streamed datasets stop there)


def validate(cfg: UptrainConfig, block_length: int) -> int:
    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time):
        raise BlockformerError("set a budget: --max-steps, --max-tokens or --max-time")
    if cfg.out.exists() and not (cfg.resume or cfg.overwrite):
        raise BlockformerError(f"{cfg.out} already exists; pass --resume to continue it or --overwrite to replace it")
    if cfg.resume and not latest_checkpoint(cfg.out):
        raise BlockformerError(f"--resume: no checkpoint in {cfg.out / 'checkpoints'}")
    if cfg.seq_len % block_length:
        fixed = math.ceil(cfg.seq_len / block_length) * block_length
        print(f"note: --seq-len {cfg.seq_len} rounded up to {fixed}, a multiple of the block length {block_length}")
        return fixed
    return cfg.seq_len


def uptrain(cfg: UptrainConfig) -> dict:
    from accelerate import Accelerator
    cfg.out = Path(cfg.out)
    src = sources.resolve(cfg.model)
    model, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    if model.config.model_type != "block_transformer":
        raise BlockformerError(f"{cfg.model} is not a Block Transformer folder; convert it first")
    cfg.seq_len = validate(cfg, model.config.block_length)
    teacher = load_teacher(cfg, tok) if cfg.teacher else None
    docs = read_documents(cfg.data, cfg.text_field, cfg.split, cfg.max_docs)
    data = pack(docs, tok, cfg.seq_len, model.config.block_length, cfg.val_fraction, cfg.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())  # on CPU, several processes use gloo
    if cfg.overwrite and not cfg.resume and acc.is_main_process:
        shutil.rmtree(cfg.out, ignore_errors=True)
    model = prepare_trainable(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # the factor is set each step from progress
    model, opt = acc.prepare(model, opt)
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "history": []}
    if cfg.resume:
        state = load_checkpoint(latest_checkpoint(cfg.out), acc.unwrap_model(model), opt, sched)
    if acc.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "uptrain_config.json").write_text(json.dumps({**asdict(cfg), "out": str(cfg.out)}, indent=2) + "\n")
    loop(cfg, acc, model, teacher, opt, sched, data, state)
    if acc.is_main_process:
        write_final(cfg, acc.unwrap_model(model), tok, data, state)
    acc.wait_for_everyone()
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
                          target_modules=r".*decoder\.layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))")
        model = get_peft_model(model, lcfg)
        for name, p in model.named_parameters():
            if "embedder.proj" in name or "token_decoder.expand" in name:
                p.requires_grad_(True)  # the new parts have no pretrained value: train them fully
    for name, p in model.named_parameters():
        if any(f"{part}." in name for part in cfg.freeze):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise BlockformerError("nothing left to train: --freeze covers every part")
    return model.train()


def autocast(cfg: UptrainConfig, device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (device.type == "cuda" or _cpu_bf16()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _cpu_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


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


def loop(cfg, acc, model, teacher, opt, sched, data, state):
    world, rank = acc.num_processes, acc.process_index
    gb = cfg.batch_size * cfg.grad_accum * world
    device = acc.device
    if teacher is not None:
        teacher.to(device)
    steps_for_tokens = math.ceil(cfg.max_tokens / (gb * cfg.seq_len)) if cfg.max_tokens else None
    budgets = [b for b in (cfg.max_steps, steps_for_tokens) if b]  # a time budget alone has no step count
    bar = tqdm(total=min(budgets) if budgets else None, initial=state["step"], disable=not acc.is_main_process,
               unit="step")
    t_start = time.perf_counter() - state["train_seconds"]
    while progress(cfg, state) < 1.0:
        t0 = time.perf_counter()
        rows = rows_for_step(state["step"], gb, data.n_train, cfg.seed)
        mine = rows[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        loss_sum, count = step_losses(cfg, acc, model, teacher, data, mine, gb, device)
        if not math.isfinite(loss_sum):
            raise BlockformerError(f"loss became {loss_sum} at step {state['step']}; stopped. The last good "
                                   f"checkpoint is kept in {cfg.out / 'checkpoints'}; try a lower --lr")
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, state)
        if cfg.grad_clip:
            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += gb * cfg.seq_len
        state["train_seconds"] = time.perf_counter() - t_start
        rec = {"step": state["step"], "loss": loss_sum / count, "lr": opt.param_groups[0]["lr"],
               "tokens": state["tokens"], "tokens_per_s": gb * cfg.seq_len / (time.perf_counter() - t0),
               "seconds": round(state["train_seconds"], 2)}
        if state["step"] % cfg.eval_every == 0 or progress(cfg, state) >= 1.0:
            rec["val_loss"] = validation_loss(acc, model, data, cfg, device)
            rec["val_ppl"] = math.exp(rec["val_loss"])
        state["history"].append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", **(
            {"val_ppl": f"{rec['val_ppl']:.1f}"} if "val_ppl" in rec else {}))
        if acc.is_main_process:
            with open(cfg.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if state["step"] % cfg.save_every == 0 and acc.is_main_process:
            save_checkpoint(cfg, acc.unwrap_model(model), opt, sched, state)
        acc.wait_for_everyone()
        if os.environ.get("BLOCKFORMER_CRASH_AFTER_STEP") == str(state["step"]):  # fault injection for tests
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()


def step_losses(cfg, acc, model, teacher, data, mine, gb, device):
    """Forward/backward over this process's micro-batches; the loss is a token mean over the global batch."""
    micro = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    batches = [tuple(t.to(device) for t in zip_rows(data, m)) for m in micro]
    n_tok = torch.tensor(sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in batches), device=device)
    n_tok = acc.reduce(n_tok, "sum").item() if acc.num_processes > 1 else n_tok.item()
    total = 0.0
    for ids, mask, labels in batches:
        with autocast(cfg, device):
            loss, _ = micro_loss(cfg, acc, model, teacher, ids, mask, labels)
        # DDP averages gradients over processes; scale so that the result is the global token mean
        acc.backward(loss * acc.num_processes / n_tok)
        total += loss.item()
    total = torch.tensor(total, device=device)
    total = acc.reduce(total, "sum").item() if acc.num_processes > 1 else total.item()
    return total, n_tok


def zip_rows(data, rows):
    got = [data.train(i) for i in rows]
    return (torch.stack([g[k] for g in got]) for k in range(3))


def micro_loss(cfg, acc, model, teacher, ids, mask, labels):
    out = model(ids, attention_mask=mask, return_hidden=True)
    h, ctx, shift = out.hidden_states
    head = acc.unwrap_model(model).get_output_embeddings()
    t_pair, t_hidden = None, None
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher.base_model(input_ids=ids, attention_mask=mask.long(),
                                       output_hidden_states=cfg.align_weight > 0)
        t_pair = (t_out.last_hidden_state, teacher.get_output_embeddings())
        t_hidden = t_out.hidden_states
    loss, n = token_loss(h, labels, head, t_pair, cfg.temperature, cfg.kd_weight if teacher is not None else 0.0)
    if cfg.align_weight and t_hidden is not None:
        split = acc.unwrap_model(model).config.num_block_layers
        a, m = alignment_loss(ctx, shift, t_hidden[split], mask, acc.unwrap_model(model).config.block_length)
        loss = loss + cfg.align_weight * a * n / max(m, 1)
    return loss, n


@torch.no_grad()
def validation_loss(acc, model, data, cfg, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(data.n_val, cfg.val_rows), cfg.batch_size):
        ids, mask, labels = (t[i:i + cfg.batch_size].to(device) for t in (data.ids, data.mask, data.labels))
        with autocast(cfg, device):
            h = model(ids, attention_mask=mask, return_hidden=True).hidden_states[0]
            loss, n = token_loss(h, labels, acc.unwrap_model(model).get_output_embeddings())
        total, count = total + loss.item(), count + n
    model.train()
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "state.pt").exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None


def save_checkpoint(cfg, model, opt, sched, state) -> None:
    ckpt = cfg.out / "checkpoints" / f"step-{state['step']}"
    with atomic_folder(ckpt, overwrite=True) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "state": state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                   tmp / "state.pt")
    for old in sorted((cfg.out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, opt, sched) -> dict:
    blob = torch.load(path / "state.pt", weights_only=False)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    metrics = path.parent.parent / "metrics.jsonl"
    if metrics.exists():  # drop lines logged after this checkpoint by the interrupted run
        keep = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= blob["state"]["step"]]
        metrics.write_text("".join(line + "\n" for line in keep))
    return blob["state"]


def write_final(cfg, model, tok, data, state) -> None:
    from .report import loss_curve
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded in: the result loads without peft
    with atomic_folder(cfg.out / "model", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"# Uptrained Block Transformer\n\nFrom `{cfg.model}` on `{cfg.data}`: "
                                       f"{state['step']} steps, {state['tokens']:,} tokens, teacher "
                                       f"`{cfg.teacher}`, {'LoRA r=' + str(cfg.lora_rank) if cfg.lora_rank else 'full'}"
                                       f" fine-tuning. See `uptrain_config.json` and `metrics.jsonl` beside it.\n")
    loss_curve(state["history"], cfg.out / "loss.png")
    summary = {"steps": state["step"], "tokens": state["tokens"], "seconds": round(state["train_seconds"], 1),
               "documents": data.documents, "data_tokens": data.tokens,
               "final": state["history"][-1] if state["history"] else None}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
