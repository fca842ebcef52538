"""Probe (issue 11): would a few of the original's own lower layers, run locally, make a better embedder?

The block decoder (the original's layers 0..S-1) reads one vector per block: the contextual init gives it the block's
last token embedding (plus a share of the others). Its layers were trained on every token's residual stream, so its
output at block i is far from the original's state that closes block i; that is the prefix's cost at a block's first
position (docs/recovery.md, the window oracle: 6.3 nats against 3.9 with the true prefix after 64k tokens).

Here the first k layers run at token level inside a short window instead: block i's vector is the original's state
entering layer k at the block's last token when layers 0..k-1 see only [the sink (token 0), the last W tokens]. The
block decoder keeps layers k..S-1 over those vectors. No training; the converted token decoder as it is. Reported:
mean NLL per token and per position in the block on WikiText-2 test text (first-token alignment, as in training):

  model          the Block Transformer as it is;
  local k/W      block vectors from layers 0..k-1 over a window of W tokens (and the sink);
  exact k        block vectors = the original's real states entering layer k (whole-row attention: an upper bound).

    python bench/local_embedder.py --model runs/diag/ctx --k 1,2,4 --window 4,8     # the recipe's conversion
    python bench/local_embedder.py --model runs/diag/ctx --tokens 256 --k 2 --window 4  # a quick look
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from window_oracle import nll_entry, stretch_block_positions, trained_setup, write_result  # noqa: E402
from blockformer.layers import causal_mask  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402


@torch.inference_mode()
def local_states(original, r: torch.Tensor, L: int, k: int, window: int | None, sink: str = "row") -> torch.Tensor:
    """(b, N, D): per block j (block j ends at token L*j), the state entering layer k at token L*j when layers
    0..k-1 see [sink, the last `window` tokens up to L*j] (window None: the whole row, the original itself).
    sink: "row" (the row's token 0, as the original sees it), "none", or a token id (one constant sink)."""
    b, T = r.shape
    ends = torch.arange(0, T, L)                                                     # block j closes at L*j
    if window is None:
        return original(input_ids=r, output_hidden_states=True).hidden_states[k][:, ends]
    out = torch.empty(b, len(ends), original.config.hidden_size)
    out[:, 0] = original(input_ids=r[:, :1], output_hidden_states=True).hidden_states[k][:, 0]
    for n in sorted({min(window, int(e)) for e in ends[1:]}):                       # windows cut short at the start
        js = [j for j, e in enumerate(ends.tolist()) if j and min(window, e) == n]
        idx = torch.tensor([list(range(ends[j] - n + 1, ends[j] + 1)) for j in js])   # (J, n)
        rows = r[:, idx].flatten(0, 1)                                               # (b*J, n)
        if sink != "none":
            first = r[:, :1] if sink == "row" else torch.full((b, 1), int(sink))
            rows = torch.cat([first[:, None].expand(-1, len(js), -1).flatten(0, 1), rows], 1)
        h = original(input_ids=rows, output_hidden_states=True).hidden_states[k][:, -1]
        out[:, js] = h.view(b, len(js), -1)
    return out


@torch.inference_mode()
def block_nll(model, r_all: torch.Tensor, block_in) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL per position in the block, counts); `block_in(r) -> (x (b, N, D), first block-decoder layer)`,
    or None for the model as it is."""
    L, P, td, bd = model.config.block_length, model.config.prefix_length, model.token_decoder, model.block_decoder
    tot, n = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for r in r_all.split(2):
        if block_in is None:
            _, ctx, _ = model.final_hidden(r, None, None, True)                      # (b, N, D)
        else:
            x, k = block_in(r)
            layers = bd.layers
            try:
                bd.layers = layers[k:]
                ctx = bd(x, torch.ones(x.shape[:2], dtype=torch.bool))
            finally:
                bd.layers = layers
        kk = torch.arange((r.shape[1] - 1) // L)                                     # blocks whose next one is whole
        tok_pos = L * kk[:, None] + 1 + torch.arange(L - 1)
        tgt_pos = L * kk[:, None] + 1 + torch.arange(L)
        pre = td.prefix(ctx[:, kk])                                                  # (b, K, P, D)
        toks = td.embed_tokens(r[:, tok_pos].flatten(0, 1), P).view(*pre.shape[:2], L - 1, -1)
        x = torch.cat([pre, toks], 2).flatten(0, 1)
        pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        h = td.run(x, pos, causal_mask(torch.ones(x.shape[:2], dtype=torch.bool)))
        logits = model.lm_head(td.norm(h[:, P - 1:])).float()
        nll = F.cross_entropy(logits.flatten(0, 1), r[:, tgt_pos].flatten(), reduction="none").view(-1, L)
        tot += nll.sum(0).double()
        n += nll.shape[0]
    return tot, n


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


@click.command()
@click.option("--source", default="default", help="The original model (folder, hub id, .gguf, default).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A converted (or uptrained) Block Transformer of --source.")
@click.option("--k", "ks", default="1,2,4", help="Comma-separated: lower layers run at token level.")
@click.option("--window", "windows", default="4,8", help="Comma-separated: tokens those layers see (plus the sink).")
@click.option("--tokens", default=2048, help="WikiText-2 test tokens scored.")
@click.option("--rows", default=512, help="Tokens per scored row.")
@click.option("--sink", "sinks", default="row", help="Comma-separated sinks to try: row (token 0), none, or a token id.")
@click.option("--block-rope-stride", default=1, help="Block i at rotary position STRIDE * i in the block decoder.")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/local_embedder.json"), help="JSON file.")
def main(source, model_dir, ks, windows, sinks, tokens, rows, block_rope_stride, json_out):
    t0 = time.perf_counter()
    original, model, split, test = trained_setup(source, model_dir, tokens, rows)
    stretch_block_positions(model, block_rope_stride)
    L = model.config.block_length
    variants = {"model": None}
    for k in ints(ks):
        variants[f"exact {k}"] = lambda r, k=k: (local_states(original, r, L, k, None), k)
        for w in ints(windows):
            for sk in sinks.split(","):
                name = f"local {k}/{w}" + ("" if sk == "row" else f" sink {sk}")
                variants[name] = lambda r, k=k, w=w, sk=sk: (local_states(original, r, L, k, w, sk), k)
    out = {}
    print(f"{'variant':<20} {'mean NLL':>9}   per position in the block")
    for name, fn in variants.items():
        tot, n = block_nll(model, test, fn)
        out[name] = nll_entry(tot, n)
        print(f"{name:<20} {out[name]['nll']:>9.3f}   {out[name]['per_position']}", flush=True)
    res = {"cpu": cpu_name(), "model": str(model_dir), "split_layer": split, "block_length": L,
           "block_rope_stride": block_rope_stride, "tokens": int(test.numel()), "variants": out,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_result(res, json_out)


if __name__ == "__main__":
    main()
