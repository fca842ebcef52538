"""Command line: a thin click layer over the stage functions.

    blockformer convert default out/smollm2-block
    blockformer --help
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .errors import BlockformerError
from .uptrain.config import SynthConfig

SYNTH = SynthConfig("", Path())  # the defaults of `synth`, written once


def friendly(fn):
    """Turn BlockformerError (and Ctrl-C) into one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BlockformerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blockformer")
def main():
    """Turn a pretrained decoder-only LM into a Block Transformer, then uptrain, evaluate and benchmark it."""


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--block-length", default=4, show_default=True, help="Tokens per block (L_B).")
@click.option("--block-layers", type=float, default=None,
              help="Original layers given to the block decoder: a count (24) or, below 1, a share of them (0.8: 24 of "
                   "30) [default: half; all for --layer-map duplicate].")
@click.option("--layer-map", type=click.Choice(["partition", "skip", "duplicate"]), default="partition",
              show_default=True, help="How original layers are shared out (the paper's three initialisations).")
@click.option("--prefix-length", default=2, show_default=True,
              help="Prefix vectors the expansion layer makes from each context embedding.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weight dtype of the output (auto: as loaded).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--init", "init", type=click.Choice(["paper", "contextual"]), default="paper", show_default=True,
              help="New parts' initialisation: the paper's (mean embedder, identity expansion, copied embeddings), "
                   "or contextual (token-decoder inputs and prefix set from the original's split-layer states on "
                   "--calib-data; see docs/recovery.md).")
@click.option("--calib-data", default="corpus/gutenberg", show_default=True,
              help="--init contextual: calibration text (file, folder, bundled corpus name or dataset).")
@click.option("--calib-tokens", default=65536, show_default=True, help="--init contextual: calibration tokens.")
@click.option("--embedder-mix", default=0.0, show_default=True,
              help="--init contextual: weight of the block's other tokens in the embedder (its last token has 1); "
                   "0 hides them from the block decoder until training mixes them in.")
@click.option("--embedder-layers", default=0, show_default=True,
              help="Run the block decoder's N lowest layers in the embedder instead, at token level inside each block "
                   "(a better block vector for N more layer passes per token; docs/recovery.md).")
@click.option("--embedder-sink", is_flag=True,
              help="With --embedder-layers: a learned vector (init: the BOS token's) opens each block's local window.")
@click.option("--local-token-inputs", is_flag=True,
              help="With --embedder-layers: each token-decoder input adds a learned linear map of the token's state "
                   "after those local layers (it then knows its block's earlier tokens; init 0, or fitted to the "
                   "original's split-layer states with --init contextual; docs/recovery.md).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly
def convert(src, out, block_length, block_layers, layer_map, prefix_length, dtype, max_shard_size, init, calib_data,
            calib_tokens, embedder_mix, embedder_layers, embedder_sink, local_token_inputs, overwrite):
    """Convert SRC (a model folder, hub id, .gguf file, or 'default') into a Block Transformer folder OUT."""
    from .convert import ConvertConfig, convert as run
    from .convert.card import summary_lines
    s = run(ConvertConfig(src, out, block_length, block_layers, layer_map, prefix_length, dtype, overwrite,
                          max_shard_size, init=init, calib_data=calib_data, calib_tokens=calib_tokens,
                          embedder_mix=embedder_mix, embedder_layers=embedder_layers, embedder_sink=embedder_sink,
                          local_token_inputs=local_token_inputs))
    for line in summary_lines(s):
        click.echo(line)
    click.echo(f"wrote {out} in {s['seconds']:.1f} s")


@main.command("eval")
@click.argument("model")
@click.option("--baseline", default=None, help="Original model to evaluate on the same items (folder, hub id, "
              ".gguf file or 'default').")
@click.option("--tasks", default="hellaswag,piqa,arc_easy,lambada_openai", show_default=True,
              help="Comma-separated tasks: hellaswag, piqa, arc_easy, arc_challenge, winogrande, sciq, "
                   "lambada_openai, wikitext.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the tasks' files [default: $BLOCKFORMER_DATA_DIR]; then the bundled copy, then the hub.")
@click.option("--limit", type=int, default=None, help="Evaluate a fixed-seed subset of N items per task.")
@click.option("--seed", default=1234, show_default=True, help="Seed of the --limit subset.")
@click.option("--batch-tokens", type=int, default=None,
              help="Tokens per scoring batch [default: 1024 on CPU, 16384 on a GPU].")
@click.option("--max-length", type=int, default=None,
              help="Longest scored window [default: the model's context, as lm-eval does].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype the models run in.")
@click.option("--device", default="auto", show_default=True, help="Device the models run on (auto: cuda if any).")
@click.option("--anchor", type=click.Choice(["context", "first"]), default="context", show_default=True,
              help="Block models: the token that closes a block, the last context token (a continuation starts a "
                   "block, as in generation) or the first token (the paper's evaluation, L_B - 1 left pads).")
@click.option("--role", default="model", show_default=True, help="Label of MODEL in the results (the baseline's "
              "is 'baseline').")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results folder (results.json, samples.json, results.png) [default: runs/eval-TIME].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@friendly
def eval_(model, baseline, tasks, data_dir, limit, seed, batch_tokens, max_length, dtype, device, anchor, role, out,
          overwrite):
    """Zero-shot evaluation of MODEL (and --baseline on the same items), with lm-eval 0.4's prompts and metrics."""
    import time
    from .eval import EvalConfig, evaluate
    from .eval.report import table
    out = out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    r = evaluate(EvalConfig(model, baseline, names, data_dir, limit, seed, batch_tokens, max_length, dtype, out,
                            overwrite, device=device, anchor=anchor, role=role))
    click.echo(table(r))
    click.echo(f"wrote {out}/results.json, samples.json and results.png")


@main.command()
@click.argument("source")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .jsonl file to write (one {text, kind, topic} per line).")
@click.option("--tokens", type=int, default=SYNTH.tokens, show_default=True, help="Stop once this many tokens are written.")
@click.option("--kinds", default=",".join(SYNTH.kinds), show_default=True,
              help="Comma-separated kinds of text: article (expository), story (narrative), howto (procedural).")
@click.option("--batch-size", type=int, default=SYNTH.batch_size, show_default=True, help="Prompts generated together.")
@click.option("--max-new-tokens", type=int, default=SYNTH.max_new_tokens, show_default=True, help="Longest document.")
@click.option("--temperature", type=float, default=SYNTH.temperature, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=SYNTH.top_p, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=SYNTH.seed, show_default=True, help="Seed of the prompt order and sampling.")
@click.option("--overwrite", is_flag=True, help="Replace --out.")
@friendly
def synth(source, out, tokens, kinds, batch_size, max_new_tokens, temperature, top_p, seed, overwrite):
    """Let SOURCE (the original model) write a training corpus to distil on (`uptrain --data OUT`)."""
    from .uptrain.synth import SynthConfig, synth as run
    cfg = SynthConfig(source, out, tokens, tuple(k.strip() for k in kinds.split(",") if k.strip()), batch_size,
                      max_new_tokens, temperature, top_p, seed, overwrite)
    s = run(cfg)
    click.echo(f"wrote {out}: {s['documents']} documents, {s['tokens']:,} tokens in {s['seconds']:.0f} s "
               f"({s['tokens_per_s']:.0f} tokens/s)")


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, help="Tokens to generate.")
@click.option("--sample/--greedy", default=False, show_default=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=0.8, show_default=True, help="Sampling temperature.")
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with this probability mass.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--compile", "compile_", is_flag=True,
              help="Compile the token decoder's step (Block Transformers): 1.14x faster decoding here after a 1-2 min "
                   "first call, so only for long generations.")
@friendly
def generate(model, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, chat, compile_):
    """Stream MODEL's continuation of PROMPT to the terminal."""
    import time
    import torch
    from transformers import TextStreamer
    from . import sources
    from .errors import BlockformerError
    from .generate import Sampling
    if not prompt:
        raise BlockformerError("empty prompt")
    if not sample and (top_k is not None or top_p is not None or seed is not None):
        raise BlockformerError("--top-k, --top-p and --seed apply to sampling: add --sample")
    Sampling(sample, temperature, top_k, top_p)  # refuses a NaN or out-of-range value before the model loads
    src = sources.resolve(model)
    m, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    if compile_:
        if not hasattr(m, "compile_decoding"):
            raise BlockformerError("--compile applies to Block Transformers; this is a vanilla model")
        m.compile_decoding()
    if chat:
        if not tok.chat_template:
            raise BlockformerError("--chat: this tokenizer has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    # generate() puts the prompt first (HF's convention) and skip_prompt drops it: the prompt is echoed as typed
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    click.echo(prompt if not chat else "", nl=False)
    t0 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, streamer=streamer)
    n = out.shape[1] - ids.shape[1]
    click.echo(f"[{n} tokens in {time.perf_counter() - t0:.2f} s]", err=True)


@main.command()
@click.argument("model")
@click.option("--baseline", default=None, help="Original model, timed in the same run (see --baselines).")
@click.option("--baselines", default="hf,hf-static,same-engine", show_default=True,
              help="How to run the original: hf (HF generate, dynamic cache), hf-static (HF static cache), "
                   "same-engine (our decoder on the degenerate conversion: the architecture's ratio alone).")
@click.option("--quick", is_flag=True, help="Shorter scenarios: prompt 1024 / generate 32 and prompt 128 / generate 256.")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(["prefill-heavy", "decode-heavy"]),
              help="Run only these scenarios [default: both].")
@click.option("--prompt-len", type=int, default=None, help="A custom scenario: prompt length (with --gen-len).")
@click.option("--gen-len", type=int, default=None, help="A custom scenario: tokens to generate (with --prompt-len).")
@click.option("--batch-sizes", default=None, help="Comma-separated batch sweep [default: 8 prefill-heavy, 16 decode-heavy].")
@click.option("--repeats", default=3, show_default=True,
              help="Timed rounds per point: each engine once per round, the order reversed between rounds; medians, "
                   "and speed-ups as medians of within-round ratios.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of both models.")
@click.option("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu", show_default=True,
              help="Device of both models.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for bench.json and throughput.png [default: runs/bench-TIME].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the bench has finished).")
@friendly
def bench(model, baseline, baselines, quick, scenarios, prompt_len, gen_len, batch_sizes, repeats, dtype, device, out,
          overwrite):
    """Measure generation throughput of MODEL (a Block Transformer) against --baseline."""
    import json
    import time
    from .bench import QUICK, SCENARIOS, BenchConfig, run_bench, table
    from .errors import BlockformerError
    table_ = dict(QUICK if quick else SCENARIOS)
    if prompt_len or gen_len:
        if not (prompt_len and gen_len) or prompt_len < 1 or gen_len < 1:
            raise BlockformerError("--prompt-len and --gen-len go together and must be at least 1")
        if scenarios or quick:
            raise BlockformerError("--prompt-len/--gen-len make a custom scenario: leave out --scenario and --quick")
        table_ = {f"custom {prompt_len}/{gen_len}": (prompt_len, gen_len)}
    elif scenarios:
        table_ = {k: v for k, v in table_.items() if k in scenarios}
    try:
        sizes = tuple(int(x) for x in batch_sizes.split(",")) if batch_sizes else None
    except ValueError:
        raise BlockformerError(f"--batch-sizes must be integers separated by commas, got {batch_sizes}")
    if batch_sizes is not None and (not sizes or min(sizes) < 1 or len(set(sizes)) < len(sizes)):
        raise BlockformerError(f"--batch-sizes must be distinct whole numbers of at least 1, got {batch_sizes!r}")
    out = out or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    cfg = BenchConfig(model, baseline, table_, sizes, repeats, tuple(b for b in baselines.split(",") if b), dtype,
                      device, out=out, overwrite=overwrite)
    res = run_bench(cfg, log=lambda s: click.echo(s, err=True))
    click.echo(table(res))
    click.echo(f"wrote {out}/bench.json and throughput.png")
    keep = lambda k: k in ("scenario", "prompt", "generate", "batch", "measured_over_predicted") or k.startswith("speedup")  # noqa: E731
    click.echo(json.dumps({"points": [{k: p[k] for k in p if keep(k)} for p in res["points"]]}))


@main.command("run")
@click.argument("recipe", required=False)
@click.option("--out", default=None, help="Run folder [default: the recipe's `out`].")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose inputs did not change.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists and is not a blockformer run folder.")
@friendly
def run_(recipe, out, force, overwrite):
    """Run a whole job from RECIPE (a YAML file or a shipped recipe's name; default: smollm2-135m-cpu):
    convert, uptrain, eval, bench, then write report.md, report.html and results.json.

    Re-running skips stages whose inputs did not change and resumes an interrupted uptraining."""
    from .pipeline import RunConfig, run
    try:
        run(RunConfig(recipe, out, force, overwrite), log=lambda s: click.echo(s, err=True))
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to continue where it stopped", err=True)
        sys.exit(130)


def parse_duration(text: str | None) -> float | None:
    """'90s', '5m', '1.5h' or plain seconds -> seconds."""
    if text is None:
        return None
    from .errors import BlockformerError
    import math
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):  # '' or 'inf' or '-5m' would never stop or stop at once
        raise BlockformerError(f"max_time (--max-time) must be a positive duration like 90s, 5m or 1.5h, got {text!r}")
    return seconds


@main.command()
@click.argument("model")
@click.option("--data", required=True, multiple=True, help="Text/jsonl/parquet file, a folder of them, or a Hugging "
              "Face dataset; repeat it to pool several sources (e.g. teacher-written text and your own).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder (checkpoints, metrics, model).")
@click.option("--teacher", default=None, help="Original model to distil from (folder, hub id, .gguf, 'default').")
@click.option("--kd-weight", default=0.5, show_default=True, help="With --teacher: loss = (1-w) CE + w KD.")
@click.option("--temperature", default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--align-weight", default=0.0, show_default=True,
              help="Weight of the MSE between the block decoder output and the teacher's hidden state at the split.")
@click.option("--hidden-weight", default=0.0, show_default=True,
              help="Weight of layer-wise distillation: each token-decoder layer's output against the teacher layer it "
                   "was copied from (relative squared error per predicted token).")
@click.option("--block-start-weight", default=1.0, show_default=True,
              help="Loss weight of the predictions of each block's first token, the ones made from the context "
                   "embedding alone (others 1; renormalised so the mean weight stays 1).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet/datasets.")
@click.option("--split", default="train", show_default=True, help="Dataset split (Hugging Face datasets).")
@click.option("--max-docs", type=int, default=None, help="Read at most N documents (streamed datasets stop there).")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per row (rounded up to the block length).")
@click.option("--batch-size", default=4, show_default=True, help="Rows per micro-batch per process.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", default=3e-4, show_default=True, help="Peak learning rate (AdamW, warmup + cosine).")
@click.option("--warmup-steps", default=20, show_default=True, help="Linear warm-up steps.")
@click.option("--max-steps", type=int, default=None, help="Budget: optimizer steps.")
@click.option("--max-tokens", type=int, default=None, help="Budget: training tokens.")
@click.option("--max-time", default=None, help="Budget: training time, e.g. 5m.")
@click.option("--lora-rank", default=0, show_default=True, help="LoRA rank on the decoder linears (0: full fine-tuning).")
@click.option("--freeze", multiple=True, help="Part to keep frozen: embedder, block_decoder, token_decoder (repeat the "
              "option or separate with commas).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the hardware supports it.")
@click.option("--eval-every", default=50, show_default=True, help="Validation every N steps.")
@click.option("--save-every", default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--keep-last", default=2, show_default=True, help="Checkpoints kept.")
@click.option("--seed", default=0, show_default=True, help="Seed of data order and padding.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace --out.")
@friendly
def uptrain(model, data, out, teacher, kd_weight, temperature, align_weight, hidden_weight, block_start_weight, text_field, split, max_docs, seq_len,
            batch_size, grad_accum, lr, warmup_steps, max_steps, max_tokens, max_time, lora_rank, freeze, precision, eval_every,
            save_every, keep_last, seed, resume, overwrite):
    """Uptrain MODEL (a converted folder) on --data, with cross-entropy or distillation from --teacher."""
    from .uptrain import UptrainConfig, uptrain as run
    data = data[0] if len(data) == 1 else data  # one source stays a plain name in uptrain_config.json
    cfg = UptrainConfig(model, data, out, teacher, kd_weight, temperature, align_weight, text_field, split, seq_len,
                        batch_size, grad_accum, lr, warmup_steps=warmup_steps, max_steps=max_steps,
                        max_tokens=max_tokens, max_time=parse_duration(max_time), lora_rank=lora_rank,
                        freeze=tuple(f.strip() for given in freeze for f in given.split(",") if f.strip()),
                        precision=precision, eval_every=eval_every,
                        save_every=save_every, keep_last=keep_last, seed=seed, resume=resume, overwrite=overwrite,
                        max_docs=max_docs, hidden_weight=hidden_weight,
                        block_start_weight=block_start_weight)
    s = run(cfg)
    last = s["history"][-1] if s["history"] else {}
    click.echo(f"{s['step']} steps, {s['tokens']:,} tokens in {s['train_seconds']:.0f} s; last loss "
               f"{last.get('loss', float('nan')):.3f}" + (f", validation perplexity {last['val_ppl']:.2f}"
                                                          if "val_ppl" in last else ""))
    click.echo(f"wrote {out}/model (plain model folder), metrics.jsonl, loss.png")


if __name__ == "__main__":
    main()
