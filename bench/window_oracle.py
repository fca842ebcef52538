"""How much of a fresh conversion's loss is the short window, and how much its inputs (issue 11 diagnosis).

The token decoder (the original's upper layers) decodes block k+1 from [prefix(context_k), tokens of block k+1]. Its
inputs are stand-ins for the original's residual stream at the split layer. This probe feeds it, per block, either
the converted model's own inputs or the original's real split-layer states (an oracle), and reports mean NLL per
token and per position in the block on WikiText-2 test text (first-token alignment, as in training):

  original          the original model itself on the same targets (its attention sees the whole row);
  model             the converted model (--init contextual) as it is;
  true prefix       prefix = [the original's state at position 0 (the sink), its state at the block's last token];
  true tokens       the block's own tokens enter as the original's states instead of the contextual table;
  true both         both: what the original's upper layers can do when attention stops at the window.

    python bench/window_oracle.py --tokens 2048                        # SmolLM2-135M, ~5 min on 2 cores
    python bench/window_oracle.py --tokens 2048 --block-layers 24 --block-length 2     # another split and block
    python bench/window_oracle.py --tokens 2048 --block-layers 24 --block-rope-stride 4 # block i at rope position 4i
    python bench/window_oracle.py --tokens 2048 --model runs/up/model   # an uptrained model instead of a fresh one
    python bench/window_oracle.py --source tiny/ --tokens 256 --calib-tokens 1024 --calib-data notes.txt --rows 64
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_probe import converted  # noqa: E402
from blockformer import datafiles, sources  # noqa: E402
from blockformer.convert import ConvertConfig  # noqa: E402
from blockformer.convert.contextual import apply_contextual, calibration_rows, read_calibration, split_stats  # noqa: E402
from blockformer.io import read_text  # noqa: E402
from blockformer.layers import causal_mask  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402

VARIANTS = ("original", "model", "true prefix", "true tokens", "true both")


@torch.inference_mode()
def block_nll(model, original, split: int, rows: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL per position in the block (L_B,), count per position) over `rows`."""
    L, P, td = model.config.block_length, model.config.prefix_length, model.token_decoder
    tot, n = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for r in rows.split(2):
        out = original(input_ids=r, output_hidden_states=True)
        H = out.hidden_states[split]                                                  # (b, T, D) entering `split`
        _, ctx, _ = model.final_hidden(r, None, None, True)                          # (b, N, D); block k ends at L*k
        k = torch.arange((r.shape[1] - 1) // L)                                      # blocks whose next one is whole
        tok_pos = L * k[:, None] + 1 + torch.arange(L - 1)                           # (K, L_B - 1) inputs
        tgt_pos = L * k[:, None] + 1 + torch.arange(L)                               # (K, L_B) targets
        if variant == "original":  # the same targets, predicted from the position before each of them
            nll = F.cross_entropy(out.logits[:, tgt_pos - 1].flatten(0, 2).float(), r[:, tgt_pos].flatten(),
                                  reduction="none").view(-1, L)
            tot += nll.sum(0).double()
            n += nll.shape[0]
            continue
        pre = td.prefix(ctx[:, k])                                                   # (b, K, P, D)
        if variant in ("true prefix", "true both"):
            pre = torch.stack([H[:, 0:1].expand(-1, len(k), -1)] * (P - 1) + [H[:, L * k]], 2)
        if variant in ("true tokens", "true both"):
            toks = H[:, tok_pos]                                                     # (b, K, L_B - 1, D)
        else:
            toks = td.embed_tokens(r[:, tok_pos].flatten(0, 1), P).view(*pre.shape[:2], L - 1, -1)
        x = torch.cat([pre, toks], 2).flatten(0, 1)                                  # (b*K, P + L_B - 1, D)
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        h = td.run(x, pos, causal_mask(torch.ones(x.shape[:2], dtype=torch.bool)))
        logits = model.lm_head(td.norm(h[:, P - 1:])).float()                         # (b*K, L_B, V)
        nll = F.cross_entropy(logits.flatten(0, 1), r[:, tgt_pos].flatten(), reduction="none").view(-1, L)
        tot += nll.sum(0).double()
        n += nll.shape[0]
    return tot, n


def contextual_setup(source: str, tokens: int, rows: int, calib_tokens: int, calib_data: str,
                     block_layers: int | None = None, block_length: int = 4, embedder_mix: float = 0.0):
    """(original, fresh `--init contextual` conversion, split layer, calibration rows, WikiText-2 test rows)."""
    torch.manual_seed(0)
    src = sources.resolve(source)
    original, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    model, fam = converted(src, original, ConvertConfig(source, Path("unused"), block_length, block_layers))
    split = model.config.provenance["token_layers_from"][0]
    calib = calibration_rows(tok, read_calibration(calib_data), calib_tokens, rows)
    apply_contextual(model, split_stats(original, fam, split, calib), embedder_mix)
    return original, model, split, calib, wikitext_rows(tok, tokens, rows)


def trained_setup(source: str, model_dir: Path, tokens: int, rows: int):
    """(original, the Block Transformer in `model_dir`, its split layer, WikiText-2 test rows)."""
    src = sources.resolve(source)
    original, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    model = sources.load_model(sources.resolve(str(model_dir)), torch.float32).eval()
    split = model.config.provenance["token_layers_from"][0]
    return original, model, split, wikitext_rows(tok, tokens, rows)


def wikitext_rows(tok, tokens: int, rows: int) -> torch.Tensor:
    path, _ = datafiles.find_data("wikitext2/wiki.test.raw")
    ids = tok(read_text(path)[: 12 * tokens])["input_ids"][:tokens]
    return torch.tensor(ids[: len(ids) // rows * rows]).view(-1, rows)


def nll_entry(tot: torch.Tensor, n: torch.Tensor) -> dict:
    """Mean NLL per token and per position in the block, from summed NLLs and counts per position."""
    return {"nll": round((tot.sum() / n.sum()).item(), 4), "per_position": [round(x, 4) for x in (tot / n).tolist()]}


def write_result(res: dict, json_out: Path) -> None:
    """The JSON file, then the same object as the last stdout line."""
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


def stretch_block_positions(model, stride: int) -> None:
    """Probe only (not a model option): the block decoder's rotary positions times `stride`. With the contextual
    init the block decoder reads each block's last token, which sat L_B positions after the previous one in the
    original; stride L_B restores those distances, stride 1 (the model's own) counts blocks."""
    if stride != 1:
        ropes = model.block_decoder.ropes
        model.block_decoder.ropes = lambda pos, dtype: ropes(pos * stride, dtype)


@click.command()
@click.option("--source", default="default", help="Original model (folder, hub id, .gguf, default).")
@click.option("--tokens", default=2048, help="WikiText-2 test tokens scored.")
@click.option("--rows", default=512, help="Tokens per scored row.")
@click.option("--calib-tokens", default=65536, help="Calibration tokens of the contextual init.")
@click.option("--calib-data", default="corpus/gutenberg", help="Calibration text.")
@click.option("--block-layers", type=int, default=None, help="Original layers in the block decoder (default: half).")
@click.option("--block-length", default=4, help="Tokens per block (L_B).")
@click.option("--block-rope-stride", default=1, help="Probe: block i enters the block decoder's rotary embedding at "
              "position STRIDE * i (L_B: the token distances the original's layers were trained on).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Probe this (uptrained) Block Transformer instead of a fresh conversion of --source.")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/window_oracle.json"), help="JSON file.")
def main(source, tokens, rows, calib_tokens, calib_data, block_layers, block_length, block_rope_stride, model_dir,
         json_out):
    t0 = time.perf_counter()
    if model_dir is not None:  # what is left after training: the trained token decoder given the oracle's inputs
        if block_layers is not None or block_length != 4:
            raise click.UsageError("--block-layers and --block-length shape a fresh conversion; --model has its own")
        original, model, split, test = trained_setup(source, model_dir, tokens, rows)
    else:
        original, model, split, _, test = contextual_setup(source, tokens, rows, calib_tokens, calib_data,
                                                           block_layers, block_length)
    stretch_block_positions(model, block_rope_stride)
    out = {}
    print(f"{'variant':<12} {'mean NLL':>9}   per position in the block")
    for v in VARIANTS:
        tot, n = block_nll(model, original, split, test, v)
        out[v] = nll_entry(tot, n)
        print(f"{v:<12} {out[v]['nll']:>9.3f}   {out[v]['per_position']}", flush=True)
    res = {"cpu": cpu_name(), "source": source, "model": str(model_dir) if model_dir else None, "split_layer": split,
           "block_length": model.config.block_length, "block_rope_stride": block_rope_stride,
           "tokens": int(test.numel()), "calib_tokens": None if model_dir else calib_tokens, "variants": out,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_result(res, json_out)


if __name__ == "__main__":
    main()
