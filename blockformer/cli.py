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
@click.option("--block-layers", type=int, default=None,
              help="Original layers given to the block decoder [default: half; all for --layer-map duplicate].")
@click.option("--layer-map", type=click.Choice(["partition", "skip", "duplicate"]), default="partition",
              show_default=True, help="How original layers are shared out (the paper's three initialisations).")
@click.option("--prefix-length", default=2, show_default=True,
              help="Prefix vectors the expansion layer makes from each context embedding.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weight dtype of the output (auto: as loaded).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly
def convert(src, out, block_length, block_layers, layer_map, prefix_length, dtype, max_shard_size, overwrite):
    """Convert SRC (a model folder, hub id, .gguf file, or 'default') into a Block Transformer folder OUT."""
    from .convert import ConvertConfig, convert as run
    from .convert.card import summary_lines
    s = run(ConvertConfig(src, out, block_length, block_layers, layer_map, prefix_length, dtype, overwrite,
                          max_shard_size))
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
              help="Folder with the tasks' files [default: $BLOCKFORMER_DATA_DIR or ../shared/data].")
@click.option("--limit", type=int, default=None, help="Evaluate a fixed-seed subset of N items per task.")
@click.option("--seed", default=1234, show_default=True, help="Seed of the --limit subset.")
@click.option("--batch-tokens", default=16384, show_default=True, help="Tokens per scoring batch.")
@click.option("--max-length", type=int, default=None,
              help="Longest scored window [default: the model's context, as lm-eval does].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype the models run in.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results folder (results.json, samples.json, results.png) [default: runs/eval-TIME].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@friendly
def eval_(model, baseline, tasks, data_dir, limit, seed, batch_tokens, max_length, dtype, out, overwrite):
    """Zero-shot evaluation of MODEL (and --baseline on the same items), with lm-eval 0.4's prompts and metrics."""
    import time
    from .eval import EvalConfig, evaluate
    from .eval.report import table
    out = out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    r = evaluate(EvalConfig(model, baseline, names, data_dir, limit, seed, batch_tokens, max_length, dtype, out,
                            overwrite))
    click.echo(table(r))
    click.echo(f"wrote {out}/results.json, samples.json and results.png")


if __name__ == "__main__":
    main()
