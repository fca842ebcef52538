"""Where a bench falls short of the cost model: prefill and decoding, measured against predicted, per engine;
and the cost model's speed-up over a batch sweep (where the ratio would reach 10x on this machine).

    python bench/phases.py runs/paper/fp32/bench.json
    python bench/phases.py runs/paper/fp32/bench.json --sweep 8,16,32,64 --scenario 2048/128 --scenario 8000/128
    python bench/phases.py /tmp/tiny-bench/bench.json --sweep 1,2 --scenario 12/6                    # tiny

Input: the `bench.json` of `blockformer bench` (its model, the machine rates it measured, and per point the time to
first token and tokens/s). An engine's prefill is its time to first token, its decoding the rest; the cost model's
prefill is `costs.predict` with no generated token. The sweep measures the skinny-matmul rate at each batch here
(`costs.skinny_bandwidth`, so run it on a quiet machine). Prints tables; the last stdout line is one JSON object.
"""
import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer import costs, sources  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402

ENGINES = (("block", "block", "block_s"), ("our decoder (original)", "original_same_engine", "original_s"))


def phase_rows(bench: dict, cfg) -> list[dict]:
    m = bench["machine"]
    flops, bw = m["matmul_gflops"] * 1e9, m["bandwidth_gbs"] * 1e9
    rows = []
    for p in bench["points"]:
        P, G, B = p["prompt"], p["generate"], p["batch"]
        dbw = m["decode_gbs_by_batch"][str(B)] * 1e9
        full, pre = costs.predict(cfg, P, G, B, 4, flops, bw, dbw), costs.predict(cfg, P, 0, B, 4, flops, bw, dbw)
        for name, key, k in ENGINES:
            if key not in p:
                continue
            total, ttft = B * G / p[key]["tokens_per_s"], p[key]["ttft_s"]
            rows.append({"scenario": f"{p['scenario']} {P}/{G} @ {B}", "engine": name,
                         "prefill_s": ttft, "prefill_pred_s": pre[k],
                         "decode_s": total - ttft, "decode_pred_s": full[k] - pre[k]})
    return rows


def sweep(bench: dict, cfg, batches, scenarios) -> list[dict]:
    m = bench["machine"]
    flops, bw = m["matmul_gflops"] * 1e9, m["bandwidth_gbs"] * 1e9
    rates = {B: costs.skinny_bandwidth(B) for B in batches}
    return [{"prompt": P, "generate": G, "batch": B, "decode_gbs": rates[B] / 1e9,
             "predicted": costs.predict(cfg, P, G, B, 4, flops, bw, rates[B])["speedup"]}
            for P, G in scenarios for B in batches]


@click.command()
@click.argument("bench_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--sweep", "batches", default="", help="Comma-separated batch sizes for the predicted sweep.")
@click.option("--scenario", "scenarios", multiple=True, help="PROMPT/GENERATE for the sweep (repeatable).")
def main(bench_json, batches, scenarios):
    bench = json.loads(Path(bench_json).read_text())
    if bench["config"].get("dtype", "float32") != "float32":
        raise click.UsageError("the cost model here is costed in fp32; pass an fp32 bench")
    cfg = sources.load_model(sources.resolve(bench["config"]["model"]), torch.float32).config
    rows = phase_rows(bench, cfg)
    print(f"CPU: {cpu_name()} (bench: {bench['machine'].get('cpu')}), {bench_json}")
    print("| scenario | engine | prefill: measured / predicted | decoding: measured / predicted |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['engine']} | {r['prefill_s']:.2f} s / {r['prefill_pred_s']:.2f} s "
              f"({r['prefill_pred_s'] / r['prefill_s']:.0%}) | {r['decode_s']:.2f} s / {r['decode_pred_s']:.2f} s "
              f"({r['decode_pred_s'] / r['decode_s']:.0%}) |")
    sw = []
    if batches:
        scen = [tuple(int(x) for x in s.split("/")) for s in scenarios] or [(pt["prompt"], pt["generate"])
                                                                            for pt in bench["points"]]
        sw = sweep(bench, cfg, [int(b) for b in batches.split(",")], scen)
        print("\n| prompt/gen | batch | skinny-matmul GB/s | predicted same-engine speed-up |\n|---|---:|---:|---:|")
        for r in sw:
            print(f"| {r['prompt']}/{r['generate']} | {r['batch']} | {r['decode_gbs']:.1f} | {r['predicted']:.2f}x |")
    print(json.dumps({"cpu": cpu_name(), "phases": rows, "sweep": sw}))


if __name__ == "__main__":
    main()
