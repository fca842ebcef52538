"""Probe (issue 11): do the token decoder's inputs gain from knowing their block's context?

The window oracle (`bench/window_oracle.py`) found that the block's own tokens entering as the original's real
split-layer states instead of the contextual table (each token's *mean* state) is worth 1.7 nats/token. Those real
states depend on the context. This probe asks how much of that a linear function of the context embedding can
supply: input of token t at position j of block k+1 = table[t] + W_j [ctx_k; 1], with W_j fitted by ridge
regression on calibration text (targets: real state minus table entry), no training. Mean NLL per token on
WikiText-2 test text (first-token alignment), for each ridge strength. Prints a line per strength; last line JSON.

    python bench/conditioned_inputs.py --calib-tokens 32768 --lambdas 1e2,1e3,1e4     # SmolLM2-135M, ~8 min, 1 core
    python bench/conditioned_inputs.py --block-layers 24 --embedder-mix 0.3          # the default recipe's conversion
    python bench/conditioned_inputs.py --block-layers 24 --embedder-mix 0.3 --features ctx+prev   # + a bigram's worth
    python bench/conditioned_inputs.py --source tiny/ --calib-tokens 1024 --calib-data notes.txt --tokens 512
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from window_oracle import contextual_setup  # noqa: E402
from blockformer.layers import causal_mask  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402


def pieces(model, original, split: int, r):
    """Original's states entering `split` (b, T, D), context embeddings (b, N, D), whole blocks k, input slots."""
    L = model.config.block_length
    H = original(input_ids=r, output_hidden_states=True).hidden_states[split]
    _, ctx, _ = model.final_hidden(r, None, None, True)                  # block k ends at position L*k
    k = torch.arange((r.shape[1] - 1) // L)
    return H, ctx[:, k], r[:, L * k[:, None] + 1 + torch.arange(L - 1)], L * k[:, None] + 1 + torch.arange(L - 1)


FEATURES = ("ctx", "ctx+prev")


def features(td, P: int, c, r, pos, which: str):
    """Regressors per input slot (b, K, L-1, F): [ctx_k; 1], and with `ctx+prev` also the contextual-table entries
    of the slot's own token and of the token before it (a bigram's worth of local context)."""
    x = [c[:, :, None].expand(-1, -1, pos.shape[1], -1)]
    if which == "ctx+prev":
        x += [td.embed_tokens(r[:, pos].flatten(0, 1), P).view(*x[0].shape),
              td.embed_tokens(r[:, pos - 1].flatten(0, 1), P).view(*x[0].shape)]
    return torch.cat(x + [torch.ones(*x[0].shape[:3], 1)], -1)


def fit(model, original, split: int, rows, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations per input slot j: X^T X (L-1, F, F) and X^T Y (L-1, F, D), float64."""
    L, P, td = model.config.block_length, model.config.prefix_length, model.token_decoder
    xtx = xty = 0
    for r in rows.split(2):
        H, c, toks, pos = pieces(model, original, split, r)
        X = features(td, P, c, r, pos, which).flatten(0, 1).double().transpose(0, 1)        # (L-1, b*K, F)
        Y = (H[:, pos] - td.embed_tokens(toks.flatten(0, 1), P).view_as(H[:, pos])).flatten(0, 1).double()
        xtx = xtx + X.transpose(1, 2) @ X
        xty = xty + X.transpose(1, 2) @ Y.transpose(0, 1)
    return xtx, xty


def nll(model, original, split: int, rows, W=None, which: str = "ctx") -> float:
    """Mean NLL per token of every whole next block, the token inputs shifted by W_j X_j when W is given."""
    L, P, td = model.config.block_length, model.config.prefix_length, model.token_decoder
    tot, n = 0.0, 0
    for r in rows.split(2):
        _, c, toks, pos = pieces(model, original, split, r)
        x_tok = td.embed_tokens(toks.flatten(0, 1), P).view(*c.shape[:2], L - 1, -1)       # (b, K, L-1, D)
        if W is not None:
            x_tok = x_tok + torch.einsum("bkjf,jfe->bkje", features(td, P, c, r, pos, which), W)
        x = torch.cat([td.prefix(c), x_tok], 2).flatten(0, 1)                               # (b*K, P+L-1, D)
        h = td.run(x, torch.arange(x.shape[1]).expand(x.shape[0], -1), causal_mask(torch.ones(x.shape[:2], dtype=torch.bool)))
        logits = model.lm_head(td.norm(h[:, P - 1:])).float()                              # (b*K, L, D)
        tgt = r[:, torch.cat([pos, pos[:, -1:] + 1], 1)].flatten()
        loss = F.cross_entropy(logits.flatten(0, 1), tgt, reduction="sum")
        tot, n = tot + loss.item(), n + tgt.numel()
    return tot / n


@click.command()
@click.option("--source", default="default", help="Original model (folder, hub id, .gguf, default).")
@click.option("--tokens", default=4096, help="WikiText-2 test tokens scored.")
@click.option("--rows", default=512, help="Tokens per row.")
@click.option("--calib-tokens", default=32768, help="Calibration tokens (contextual init and the fit).")
@click.option("--calib-data", default="corpus/gutenberg", help="Calibration text.")
@click.option("--block-layers", type=int, default=None, help="Original layers in the block decoder (default: half).")
@click.option("--embedder-mix", type=float, default=0.0, help="Weight of the block's other tokens in the embedder.")
@click.option("--features", "which", type=click.Choice(FEATURES), default="ctx",
              help="Regressors: the context embedding; or it plus the table entries of the token and the one before.")
@click.option("--lambdas", default="1e2,1e3,1e4", help="Comma-separated ridge strengths.")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/conditioned_inputs.json"), help="JSON.")
@torch.inference_mode()
def main(source, tokens, rows, calib_tokens, calib_data, block_layers, embedder_mix, which, lambdas, json_out):
    original, model, split, calib, test = contextual_setup(source, tokens, rows, calib_tokens, calib_data,
                                                           block_layers, embedder_mix=embedder_mix)
    xtx, xty = fit(model, original, split, calib, which)
    res = {"cpu": cpu_name(), "source": source, "split_layer": split, "embedder_mix": embedder_mix, "features": which, "tokens": int(test.numel()), "calib_tokens": calib_tokens,
           "contextual": round(nll(model, original, split, test), 4), "conditioned": {}}
    print(f"contextual init            {res['contextual']:.3f} nats/token", flush=True)
    eye = torch.eye(xtx.shape[-1], dtype=torch.float64)
    for lam in (float(x) for x in lambdas.split(",")):
        W = torch.stack([torch.linalg.solve(xtx[j] + lam * eye, xty[j]) for j in range(len(xtx))]).float()
        res["conditioned"][f"{lam:g}"] = round(nll(model, original, split, test, W, which), 4)
        print(f"+ conditioned, ridge {lam:<8g} {res['conditioned'][f'{lam:g}']:.3f} nats/token", flush=True)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
