"""Is `torch.compile` worth it for block decoding? Eager vs compiled token-decoder steps, same prompts, same run.

    python bench/compile_decode.py runs/curve/ctx --batch-sizes 8,16 --prompt-len 128 --gen-len 128 --repeats 3
    python bench/compile_decode.py out/tiny --batch-sizes 2 --prompt-len 16 --gen-len 8 --repeats 1      # tiny

The token decoder's step (`TokenDecoder.run_layers`, L_B steps per block, the bulk of decoding) is compiled with
inductor, `dynamic=False`: its local window has p + L_B - 1 fixed slots, so there are only a handful of shapes.
Compilation is done in a warm-up call and reported apart; then eager and compiled generation alternate, medians.
Greedy tokens must be equal (else the compiled path is wrong and no speed is quoted). Prints a table with the CPU
model and writes JSON (`--out`); the last stdout line is one JSON object.
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
from blockformer.machine import cpu_name  # noqa: E402


def timed(model, ids, gen_len):
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=gen_len, eos_token_id=None)
    return time.perf_counter() - t0, out


def compile_token_steps(model):
    model.compile_decoding()        # an instance attribute that shadows TokenDecoder.run_layers


def eager(model):
    model.compile_decoding(False)


@click.command()
@click.argument("model")
@click.option("--batch-sizes", default="8,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, help="Prompt tokens (random ids).")
@click.option("--gen-len", default=128, show_default=True, help="Tokens generated.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per engine (alternated; median).")
@click.option("--out", default="runs/compile_decode.json", show_default=True, help="JSON results.")
def main(model, batch_sizes, prompt_len, gen_len, repeats, out):
    src = sources.resolve(model)
    m = sources.load_model(src, torch.float32).eval()
    rows = []
    for B in [int(b) for b in batch_sizes.split(",")]:
        ids = torch.randint(5, m.config.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(0))
        eager(m)
        timed(m, ids, gen_len)                                                 # warm-up
        compile_token_steps(m)
        t_compile, _ = timed(m, ids, gen_len)                                  # compiles (and runs once)
        times = {"eager": [], "compiled": []}
        outs = {}
        for _ in range(repeats):
            for name, setup in (("eager", eager), ("compiled", compile_token_steps)):
                setup(m)
                t, outs[name] = timed(m, ids, gen_len)
                times[name].append(t)
        same = torch.equal(outs["eager"], outs["compiled"])
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"batch": B, "prompt_len": prompt_len, "gen_len": gen_len, "same_tokens": same,
                     "eager_tok_s": B * gen_len / med["eager"], "compiled_tok_s": B * gen_len / med["compiled"],
                     "speedup": med["eager"] / med["compiled"] if same else None,
                     "first_compiled_call_s": t_compile, "times": times})
        eager(m)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {model}")
    print("| batch | prompt/gen | eager tok/s | compiled tok/s | speed-up | same tokens | first compiled call |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"| {r['batch']} | {r['prompt_len']}/{r['gen_len']} | {r['eager_tok_s']:.1f} | {r['compiled_tok_s']:.1f} "
              f"| {sp} | {r['same_tokens']} | {r['first_compiled_call_s']:.1f} s |")
    res = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "model": model,
           "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"cpu": res["cpu"], "speedups": [r["speedup"] for r in rows],
                      "same_tokens": all(r["same_tokens"] for r in rows)}))


if __name__ == "__main__":
    main()
