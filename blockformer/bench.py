"""Generation throughput: a Block Transformer vs its original through Hugging Face `generate`, in one run.

    blockformer bench out/smollm2-block --baseline default                 # the paper's two scenarios
    blockformer bench out/smollm2-block --baseline default --quick         # shorter lengths, a minute or two
    blockformer bench out/tiny --baseline tiny-orig --prompt-len 16 --gen-len 8 --batch-sizes 1,2 --repeats 2

Random prompt tokens, EOS disabled, one warm-up each, then rounds in which every engine runs once, the order reversed
from round to round (clock read after synchronising); speed-ups are medians of the ratios within a round.
The original runs three ways in the same run and dtype (`--baselines`): HF `generate` with its default attention (sdpa)
and dynamic cache; HF `generate` with its static cache; and our own decoder running the degenerate conversion (the
original exactly). The block model's speed-up over the last is the architecture's alone, and the cost model
(costs.py) predicts that one.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import costs, sources
from .errors import BlockformerError
from .io import atomic_folder, check_out
from .machine import check_device, cpu_name

SCENARIOS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 2048)}
QUICK = {"prefill-heavy": (512, 32), "decode-heavy": (128, 128)}
DEFAULT_BATCH = {"prefill-heavy": 8, "decode-heavy": 16}
DTYPES = ("float32", "bfloat16", "float16")
# the original, three ways: Hugging Face generate with its dynamic cache, with its static cache, and our own decoder
# (the degenerate conversion, exactly the original): the last ratio is the architecture's alone
BASELINES = ("hf", "hf-static", "same-engine")


@dataclass
class BenchConfig:
    model: str
    baseline: str | None = None
    scenarios: dict = field(default_factory=lambda: dict(SCENARIOS))
    batch_sizes: tuple[int, ...] | None = None     # default: 8 for prefill-heavy, 16 for decode-heavy
    repeats: int = 3
    baselines: tuple[str, ...] = BASELINES   # which ways to run the original (see BASELINES)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    out: Path | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Value checks, no I/O: run by `run_bench` and by recipes (so the CLI and YAML share them)."""
        if not self.scenarios:
            raise BlockformerError("scenarios is empty; give at least one [prompt_len, gen_len]")
        for name, pg in self.scenarios.items():
            if not (isinstance(pg, (list, tuple)) and len(pg) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pg)):
                raise BlockformerError(f"scenarios.{name} must be [prompt_len, gen_len], both >= 1, got {pg!r}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise BlockformerError(f"batch_sizes must be at least 1 each, got {list(self.batch_sizes)}")
        if self.repeats < 1:
            raise BlockformerError(f"repeats must be at least 1, got {self.repeats}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown or not self.baselines:
            raise BlockformerError(f"baselines must be some of {', '.join(BASELINES)}, got {list(self.baselines)}")
        if self.dtype not in DTYPES:
            raise BlockformerError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")


def run_bench(cfg: BenchConfig, log=print) -> dict:
    cfg.check()
    check_device(cfg.device)
    if cfg.out:
        check_out(Path(cfg.out), cfg.overwrite, [cfg.model, cfg.baseline])  # before the long work
    model = _load(cfg.model, cfg)
    baseline = _load(cfg.baseline, cfg) if cfg.baseline else None
    if model.config.model_type != "block_transformer":
        raise BlockformerError(f"{cfg.model} is not a Block Transformer folder (model_type {model.config.model_type})")
    runners = baseline_runners(baseline, cfg.baselines) if baseline is not None else {}
    peak, bw = costs.machine_rates(getattr(torch, cfg.dtype), cfg.device)  # the roofline of the device used
    res = {"config": {**asdict(cfg), "out": str(cfg.out)}, "machine": machine(peak, bw, cfg.device), "points": []}
    for name, (P, G) in cfg.scenarios.items():
        for B in cfg.batch_sizes or (DEFAULT_BATCH.get(name, 8),):
            point = {"scenario": name, "prompt": P, "generate": G, "batch": B}
            _check_context(model, P, G)
            ids = torch.randint(10, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(cfg.seed))
            ids = ids.to(cfg.device)
            gens = {"block": lambda n: model.generate(ids, max_new_tokens=n, eos_token_id=None),
                    **{role: (lambda n, run=run: run(ids, n)) for role, run in runners.items()}}
            point.update(measure(gens, B, G, cfg))  # the original, each way, in the same rounds as the block model
            point["block"]["kv_cache_bytes"] = B * model.kv_cache_bytes(P + G)
            bytes_el = model.lm_head.weight.element_size()
            for role in runners:
                point[role]["kv_cache_bytes"] = B * costs.original_kv_bytes(baseline.config, P + G, bytes_el)
                point[f"speedup_vs_{role}"] = paired_speedup(point["block"]["seconds_all"], point[role]["seconds_all"])
            if "original" in point:
                point["speedup"] = point["speedup_vs_original"]  # against HF generate, as the report has it
            decode_gbs = res["machine"].setdefault("decode_gbs_by_batch", {})
            if B not in decode_gbs:  # once per batch size, however many scenarios use it
                decode_gbs[B] = costs.skinny_bandwidth(B, getattr(torch, cfg.dtype), cfg.device) / 1e9
            point["predicted"] = costs.predict(model.config, P, G, B, bytes_el, peak, bw, decode_gbs[B] * 1e9)
            if "original_same_engine" in point:  # the cost model predicts the architecture's ratio
                point["measured_over_predicted"] = point["speedup_vs_original_same_engine"] / point["predicted"]["speedup"]
            res["points"].append(point)
            log(point_line(point))
    if cfg.out:
        write(res, Path(cfg.out), cfg.overwrite)
    return res


def _load(spec: str, cfg: BenchConfig):
    try:
        return sources.load_model(sources.resolve(spec), getattr(torch, cfg.dtype)).to(cfg.device)
    except BlockformerError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BlockformerError(f"could not load {spec}: {sources.first_line(e)}") from e


def _check_context(model, P: int, G: int) -> None:
    if P + G > model.config.max_position_embeddings:
        raise BlockformerError(f"prompt {P} + generate {G} exceeds the model's context of "
                               f"{model.config.max_position_embeddings} tokens")


ROLES = {"hf": "original", "hf-static": "original_static", "same-engine": "original_same_engine"}


def baseline_runners(baseline, which) -> dict:
    """role -> run(ids, n): the original generating n tokens each way asked for."""
    out = {}
    if "hf" in which:
        out[ROLES["hf"]] = lambda ids, n: hf_generate(baseline, ids, n)
    if "hf-static" in which:
        out[ROLES["hf-static"]] = lambda ids, n: hf_generate(baseline, ids, n, cache_implementation="static")
    if "same-engine" in which:
        from .convert.convert import same_engine
        ours = same_engine(baseline)
        out[ROLES["same-engine"]] = lambda ids, n: ours.generate(ids, max_new_tokens=n, eos_token_id=None)
    return out


def hf_generate(model, ids, n: int, **kw):
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)


def measure(gens: dict, B: int, G: int, cfg: BenchConfig) -> dict:
    """{role: wall times, medians, time to first token, peak memory} for each engine in `gens` (role -> gen(n)).

    A warm-up of each, then rounds: every engine once per round, in an order that reverses from one round to the
    next (ABC CBA ...), so that a machine that speeds up or slows down during the bench (shared or throttled cores)
    weighs on every engine alike; `paired_speedup` then compares engines within a round."""
    roles = list(gens)
    try:
        for role in roles:
            gens[role](2)  # warm-up: every code path, caches allocated once
        ttft = {role: [] for role in roles}
        for order in _rounds(roles, cfg.repeats):
            for role in order:
                ttft[role].append(_timed(lambda: gens[role](1), cfg.device))
        times, peaks = {role: [] for role in roles}, {role: 0 for role in roles}
        for order in _rounds(roles, cfg.repeats):
            for role in order:
                reset_peak_memory(cfg.device)
                times[role].append(_timed(lambda: gens[role](G), cfg.device))
                peaks[role] = max(peaks[role], peak_memory(cfg.device) or 0)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if "memory" in str(e).lower() or "alloc" in str(e).lower():
            raise BlockformerError(f"batch {B} does not fit in memory; try a smaller --batch-sizes") from e
        raise
    return {role: {"seconds": statistics.median(times[role]), "seconds_all": times[role],
                   "tokens_per_s": B * G / statistics.median(times[role]), "ttft_s": statistics.median(ttft[role]),
                   "peak_memory_bytes": peaks[role] or None} for role in roles}


def _rounds(roles: list, repeats: int):
    """The order of each round: as given, then reversed, alternately."""
    return [roles if r % 2 == 0 else roles[::-1] for r in range(repeats)]


def paired_speedup(block_times: list, other_times: list) -> float:
    """Median over rounds of (the other engine's time / the block model's), both generating the same tokens: each
    ratio compares two runs made back to back, so drift of the machine between rounds cancels."""
    return statistics.median(o / b for b, o in zip(block_times, other_times))


def _timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def sync(device: str) -> None:
    costs.synchronize(device)


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: reset the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device: str) -> int | None:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine(peak: float, bw: float, device: str = "cpu") -> dict:
    """Where the bench ran; the rates are those of `device`."""
    on_cuda = torch.device(device).type == "cuda"
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device), "matmul_gflops": peak / 1e9, "bandwidth_gbs": bw / 1e9,
            "cuda": torch.cuda.get_device_name(torch.device(device)) if on_cuda else None}


LABELS = {"original": "original (HF generate)", "original_static": "original (HF static cache)",
          "original_same_engine": "original (our decoder)", "block": "block"}


def point_line(p: dict) -> str:
    s = f"{p['scenario']:>14} P={p['prompt']:<5} G={p['generate']:<5} B={p['batch']:<3} block {p['block']['tokens_per_s']:8.1f} tok/s"
    for role in ROLES.values():
        if role in p:
            s += f" | {p[f'speedup_vs_{role}']:.2f}x vs {LABELS[role]}"
    return s + f" | predicted {p['predicted']['speedup']:.2f}x"


def table(res: dict) -> str:
    """One row per model and point; an original's row holds the block model's speed-up over it, and the row of
    our decoder (the same engine) the cost model's prediction of that ratio."""
    head = ("scenario", "P", "G", "B", "model", "tok/s", "TTFT s", "peak MiB", "KV MiB", "block speed-up", "predicted")
    rows = []
    for p in res["points"]:
        for role in (*ROLES.values(), "block"):
            if role in p:
                m = p[role]
                rows.append((p["scenario"], p["prompt"], p["generate"], p["batch"], LABELS[role],
                             f"{m['tokens_per_s']:.1f}", f"{m['ttft_s']:.3f}",
                             f"{(m['peak_memory_bytes'] or 0) / 2**20:.0f}", f"{m['kv_cache_bytes'] / 2**20:.1f}",
                             f"{p[f'speedup_vs_{role}']:.2f}x" if role != "block" else "",
                             f"{p['predicted']['speedup']:.2f}x" if role == "original_same_engine" else ""))
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(x).rjust(n) for x, n in zip(r, w))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * n for n in w]), *map(fmt, rows)])


def write(res: dict, out: Path, overwrite: bool = True) -> None:
    with atomic_folder(out, overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
        plot(res, tmp / "throughput.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scen = list(dict.fromkeys(p["scenario"] for p in res["points"]))
    fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4), squeeze=False)
    for ax, name in zip(axes[0], scen):
        pts = [p for p in res["points"] if p["scenario"] == name]
        for role, style in (("original", "o-"), ("original_static", "v-"), ("original_same_engine", "^-"),
                            ("block", "s-")):
            xs = [p["batch"] for p in pts if role in p]
            if xs:
                ax.plot(xs, [p[role]["tokens_per_s"] for p in pts if role in p], style, label=LABELS[role])
        ax.set(title=f"{name} (P={pts[0]['prompt']}, G={pts[0]['generate']})", xlabel="batch size",
               ylabel="generated tokens/s", xscale="log", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
