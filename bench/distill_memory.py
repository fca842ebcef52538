"""Peak memory (RSS) of one distillation step: student forward + backward, teacher forward, chunked KD loss.

    python bench/distill_memory.py out/smollm2-block --teacher default --batch-size 2 --seq-len 512
    python bench/distill_memory.py out/smollm2-block --losses old_losses.py ...   # another losses.py, to compare

fp32, no autocast; one warm-up step, then a thread samples RSS every 2 ms during the measured step. The last stdout
line is one JSON object.
"""
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import click
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer import sources  # noqa: E402


def load_token_loss(path):
    if path is None:
        from blockformer.uptrain.losses import token_loss
        return token_loss
    spec = importlib.util.spec_from_file_location("other_losses", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.token_loss


@click.command()
@click.argument("model")
@click.option("--teacher", default="default", show_default=True)
@click.option("--batch-size", default=2, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--losses", "losses_py", default=None, help="A losses.py to measure instead of the package's.")
def main(model, teacher, batch_size, seq_len, losses_py):
    token_loss = load_token_loss(losses_py)
    torch.manual_seed(0)
    student = sources.load_model(sources.resolve(model), torch.float32).train()
    t_model = sources.load_model(sources.resolve(teacher), torch.float32).eval().requires_grad_(False)
    ids = torch.randint(100, student.config.vocab_size - 100, (batch_size, seq_len))
    mask = torch.ones_like(ids, dtype=torch.bool)

    def step():
        h = student(ids, attention_mask=mask, return_hidden=True).hidden_states[0]
        with torch.no_grad():
            th = t_model.base_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        teacher = (th, t_model.get_output_embeddings())
        loss, n = token_loss(h, ids, student.get_output_embeddings(), teacher, 1.0, 0.5)
        (loss / n).backward()
        student.zero_grad(set_to_none=True)

    step()  # warm-up: allocator pools, lazy initialisation
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    mib = lambda b: round(b / 2**20)  # noqa: E731
    print(json.dumps({"batch": batch_size, "seq_len": seq_len, "losses": losses_py or "package",
                      "seconds": round(seconds, 1), "rss_before_mib": mib(base), "peak_mib": mib(peak[0]), "step_extra_mib": mib(peak[0] - base)}))


if __name__ == "__main__":
    main()
