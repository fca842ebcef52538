"""How far each part of the contextual initialisation moves a fresh conversion, before any training.

Mean NLL per token of WikiText-2 test text (rows of 512 tokens, first-token alignment) for the original, the paper's
initialisation, and the contextual one built up a part at a time. Prints a table, writes JSON, last line one JSON.

    python bench/init_probe.py --tokens 4096 --calib-tokens 65536                 # SmolLM2-135M, ~6 min on 2 cores
    python bench/init_probe.py --source tiny/ --tokens 256 --calib-tokens 1024 --calib-data notes.txt --rows 64
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from blockformer import datafiles, sources
from blockformer.convert import ConvertConfig
from blockformer.convert.contextual import (apply_contextual, calibration_rows, contextual_table, read_calibration,
                                            split_stats)
from blockformer.convert.convert import assemble, plan_parts
from blockformer.families import family_for
from blockformer.io import read_text
from blockformer.machine import cpu_name


def nll(model, rows: torch.Tensor) -> float:
    total, n = 0.0, 0
    with torch.inference_mode():
        for r in rows.split(2):
            logits = model(r).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), r[:, 1:].flatten(), reduction="sum").item()
            n += r[:, 1:].numel()
    return total / n


def converted(src, original, cfg: ConvertConfig):
    hf = original.config
    fam = family_for(hf.model_type)
    arch = fam.arch(hf)
    return assemble(cfg, hf, arch, src, original, fam, plan_parts(cfg, hf.num_hidden_layers)).eval(), fam


def ladder(model, stats) -> list[tuple[str, callable]]:
    """Cumulative steps from the paper's init to the full contextual one."""
    D = model.config.hidden_size

    def table():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.token_decoder.embed.weight.data.copy_(contextual_table(model.token_decoder.embed.weight, stats).float())

    def sink():
        model.token_decoder.expand.weight.data[:D] = 0
        model.token_decoder.expand.bias.data[:D] = stats.first.float()
    return [("+ contextual input table (head untied)", table), ("+ attention-sink prefix slot", sink),
            ("+ last-token embedder (= --init contextual)", lambda: apply_contextual(model, stats))]


@click.command()
@click.option("--source", default="default", show_default=True, help="Original model (folder, .gguf, 'default').")
@click.option("--tokens", default=4096, show_default=True, help="WikiText-2 test tokens scored.")
@click.option("--rows", default=512, show_default=True, help="Tokens per scored row.")
@click.option("--calib-tokens", default=65536, show_default=True, help="Calibration tokens.")
@click.option("--calib-data", default="corpus/gutenberg", show_default=True, help="Calibration text.")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/init_probe.json"), show_default=True,
              help="Where the results go.")
def main(source, tokens, rows, calib_tokens, calib_data, json_out):
    torch.manual_seed(0)
    src = sources.resolve(source)
    original, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    path, _ = datafiles.find_data("wikitext2/wiki.test.raw")
    ids = tok(read_text(path)[: 12 * tokens])["input_ids"][:tokens]
    scored = torch.tensor(ids[: len(ids) // rows * rows]).view(-1, rows)
    model, fam = converted(src, original, ConvertConfig(source, Path("unused")))
    t0 = time.perf_counter()
    stats = split_stats(original, fam, model.config.provenance["token_layers_from"][0],
                        calibration_rows(tok, read_calibration(calib_data), calib_tokens, 512))
    calib_s = time.perf_counter() - t0
    results = {"original": nll(original, scored), "paper init": nll(model, scored)}
    for name, step in ladder(model, stats):
        step()
        results[name] = nll(model, scored)
    for name, v in results.items():
        click.echo(f"{name:<45} {v:7.3f}")
    out = {"source": source, "tokens_scored": scored.numel(), "calib_tokens": stats.tokens, "calib_seconds": calib_s,
           "cpu": cpu_name(), "nll": results}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(out, indent=2) + "\n")
    click.echo(json.dumps(out))


if __name__ == "__main__":
    main()
