"""Training tokens/s: the converted model (full and LoRA) beside the original model, same data, same run; and
with `--precisions fp32,bf16`, the converted model's full step in each precision, the loss difference between them
on the same batch, and the teacher's no-grad forward (what distillation adds per step) in each.

    python bench/uptrain_speed.py out/smollm2-block --original default --steps 4 --seq-len 512 --batch-size 4
    python bench/uptrain_speed.py out/smollm2-block --precisions fp32,bf16 --steps 3 --seq-len 256
    python bench/uptrain_speed.py out/tiny --original tiny-orig --steps 2 --seq-len 32 --batch-size 2   # tiny

The converted model runs three ways: full fine-tuning, LoRA r=16, and full with `--freeze` parts kept frozen (default
the block decoder and the embedder); each row also gives its trainable parameters (AdamW keeps two fp32 states each).

Each setting: one warm-up step, then the median step time over `--steps` steps (AdamW; `auto` = bf16 autocast where
supported, as `blockformer uptrain` does). The CPU model and its bf16 features are printed beside the figures. The
last stdout line is one JSON object.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer import sources  # noqa: E402
from blockformer.machine import cpu_flags, cpu_name  # noqa: E402
from blockformer.uptrain.train import UptrainConfig, autocast, prepare_trainable  # noqa: E402

def cpu_features() -> list[str]:
    return sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f"})


@torch.no_grad()
def forward_time(model, ids, steps, cfg):
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(cfg, ids.device):
            model(ids)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def precision_rows(model, original, ids, steps) -> dict:
    """Full step and teacher forward per precision, and |loss_bf16 - loss_fp32| on the first batch."""
    out = {}
    for prec in ("fp32", "bf16"):
        cfg = UptrainConfig(model, "", Path("."), precision=prec)
        m = sources.load_model(sources.resolve(model), torch.float32).train()
        with autocast(cfg, ids.device):
            first = float(m(ids, labels=ids).loss)
        t = step_times(m, ids, steps, cfg, True)
        teacher = sources.load_model(sources.resolve(original), torch.float32)
        out[prec] = {"step_tokens_per_s": ids.numel() / t, "first_loss": first,
                     "teacher_forward_s": forward_time(teacher, ids, steps, cfg), "step_s": t}
        print(f"{prec}: {out[prec]['step_tokens_per_s']:7.1f} tokens/s per full step, teacher forward "
              f"{out[prec]['teacher_forward_s']:.2f} s, first loss {first:.4f}")
    out["loss_diff"] = abs(out["bf16"]["first_loss"] - out["fp32"]["first_loss"])
    return out


def step_times(model, ids, steps, cfg, block: bool):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(cfg, ids.device):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command()
@click.argument("model")
@click.option("--original", default="default", help="The original model.")
@click.option("--steps", default=4, help="Timed steps per setting.")
@click.option("--seq-len", default=512, help="Tokens per row.")
@click.option("--batch-size", default=4, help="Rows per step.")
@click.option("--precisions", default=None, help="'fp32,bf16': compare precisions instead of full/LoRA/original.")
@click.option("--freeze", default="block_decoder,embedder", show_default=True,
              help="Comma-separated parts frozen in the third converted row.")
def main(model, original, steps, seq_len, batch_size, precisions, freeze):
    cfg = UptrainConfig(model, "", Path("."))
    ids = torch.randint(10, 40000, (batch_size, seq_len))
    print(f"CPU: {cpu_name()} ({', '.join(cpu_features()) or 'no AVX-512/AMX'}); threads {torch.get_num_threads()}")
    if precisions:
        res = precision_rows(model, original, ids, steps)
        print(json.dumps({"precisions": res, "cpu": cpu_name(), "features": cpu_features(), "seq_len": seq_len,
                          "batch_size": batch_size}))
        return
    rows, trainable = {}, {}
    frozen = tuple(p for p in freeze.split(",") if p)
    for name, spec, lora, parts in (("original (full)", original, 0, ()), ("converted (full)", model, 0, ()),
                                    ("converted (LoRA r=16)", model, 16, ()),
                                    (f"converted (frozen: {', '.join(frozen)})", model, 0, frozen)):
        m = sources.load_model(sources.resolve(spec), torch.float32)
        if "converted" in name:
            cfg.lora_rank, cfg.freeze = lora, parts
            m = prepare_trainable(m, cfg)
        m.train()
        t = step_times(m, ids.clamp(max=m.config.vocab_size - 1), steps, cfg, "converted" in name)
        rows[name] = batch_size * seq_len / t
        trainable[name] = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{name:48} {rows[name]:8.1f} tokens/s, {trainable[name] / 1e6:6.1f}M trainable parameters")
    print(json.dumps({"tokens_per_s": rows, "trainable_params": trainable, "cpu": cpu_name(), "seq_len": seq_len,
                      "batch_size": batch_size}))


if __name__ == "__main__":
    main()
