"""Training tokens/s: the converted model (full and LoRA) beside the original model, same data, same run.

    python bench/uptrain_speed.py out/smollm2-block --original default --steps 4 --seq-len 512 --batch-size 4
    python bench/uptrain_speed.py out/tiny --original tiny-orig --steps 2 --seq-len 32 --batch-size 2   # tiny

Each setting: one warm-up step, then the median step time over `--steps` steps (AdamW, bf16 autocast where
supported, as `blockformer uptrain` does). The last stdout line is one JSON object.
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
from blockformer.uptrain.train import UptrainConfig, autocast, prepare_trainable  # noqa: E402


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
def main(model, original, steps, seq_len, batch_size):
    cfg = UptrainConfig(model, "", Path("."))
    ids = torch.randint(10, 40000, (batch_size, seq_len))
    rows = {}
    for name, spec, lora in (("original (full)", original, 0), ("converted (full)", model, 0),
                             ("converted (LoRA r=16)", model, 16)):
        m = sources.load_model(sources.resolve(spec), torch.float32)
        if "converted" in name:
            cfg.lora_rank = lora
            m = prepare_trainable(m, cfg)
        m.train()
        t = step_times(m, ids.clamp(max=m.config.vocab_size - 1), steps, cfg, "converted" in name)
        rows[name] = batch_size * seq_len / t
        print(f"{name:24} {rows[name]:8.1f} tokens/s")
    print(json.dumps({"tokens_per_s": rows, "seq_len": seq_len, "batch_size": batch_size}))


if __name__ == "__main__":
    main()
