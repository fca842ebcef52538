"""Contextual initialisation (`convert --init contextual`): start the new parts where the original's stream is.

Why: the token decoder's layers were trained to read the original's residual stream at the split layer, but the
paper's initialisation feeds them raw token embeddings plus a mean of embeddings pushed through the lower layers.
Three changes, each aimed at that mismatch (measured on SmolLM2-135M, docs/recovery.md):

  1. token-decoder input table <- each token's mean hidden state at the split layer over calibration text; tokens
     never seen get a least-squares linear map of their embedding fitted on the seen ones. The LM head is untied
     so that it keeps the original's output embeddings.
  2. prefix slot 0 <- a constant "attention sink": the original's mean hidden state at position 0. Many heads of
     the upper layers park their attention on the first position; the short window otherwise has none.
  3. embedder <- the block's last token instead of the mean: the block decoder then reads real token vectors, as
     the lower layers were trained to, and block i's context embedding is the hidden state that closes block i.
     `embedder_mix` a adds the block's other tokens at weight a (last token at 1): the last token alone hides 3 of
     every 4 tokens from the block decoder, and a projection that starts at exactly 0 for them learns to use them
     slowly; a small share keeps the lower layers reading a near-real token vector (docs/recovery.md).

    blockformer convert default out/smollm2-ctx --init contextual                # bundled corpus, 65,536 tokens
    blockformer convert tiny/ out/tiny-ctx --init contextual --calib-tokens 2048 --calib-data notes.txt
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import BlockformerError
from ..families import Family
from ..model import scaled_lookup

INITS = ("paper", "contextual")


@dataclass
class SplitStats:
    sums: torch.Tensor      # (V, D) float64: summed hidden states at the split layer, per input token id
    counts: torch.Tensor    # (V,) float64: occurrences per token id
    first: torch.Tensor     # (D,) float64: mean hidden state at position 0 (the attention sink)
    tokens: int
    states: torch.Tensor | None = None  # (rows, T, D) float32: every state, when kept (to fit the bridge)


def read_calibration(data: str) -> list[str]:
    """The calibration documents; read before the model loads, so a wrong name fails at once."""
    from ..uptrain.data import read_documents
    return read_documents(data)


def calibration_rows(tokenizer, data: str | list[str], n_tokens: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(rows, seq_len) token ids drawn from random offsets of the calibration text. Each row starts the way the
    tokenizer starts any text (with BOS only if it adds one itself), so position 0 looks like the first position
    the model will see in use: its mean state is the attention sink the prefix slot copies."""
    docs = read_calibration(data) if isinstance(data, str) else data
    bos = special_prefix(tokenizer)
    stream: list[int] = []
    for doc in docs:  # enough text for twice the budget, tokenised in chunks (books are long)
        for i in range(0, len(doc), 20000):
            stream += tokenizer.encode(doc[i:i + 20000], add_special_tokens=False)
        if len(stream) >= 2 * n_tokens:
            break
    body = seq_len - len(bos)
    starts = list(range(0, len(stream) - body, body))
    if not starts:
        raise BlockformerError(f"the calibration text holds {len(stream)} tokens: fewer than one row of {seq_len}")
    random.Random(seed).shuffle(starts)
    rows = [bos + stream[s:s + body] for s in starts[: max(1, n_tokens // seq_len)]]
    return torch.tensor(rows)


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text on its own (e.g. [BOS] for Llama 2, [] for SmolLM2)."""
    full, plain = tokenizer("a")["input_ids"], tokenizer.encode("a", add_special_tokens=False)
    return list(full[: len(full) - len(plain)]) if plain and full[len(full) - len(plain):] == plain else []


@torch.no_grad()
def split_stats(original, fam: Family, layer: int, rows: torch.Tensor, batch: int = 4,
                keep: bool = False) -> SplitStats:
    """Per-token sums of the original's hidden state entering layer `layer` (the token decoder's first layer).

    Each pass stops at that layer: the layers above cannot change their own input, and skipping them halves the
    cost for a half-and-half partition."""
    layers = original.get_submodule(fam.layers)
    D, V = original.get_input_embeddings().weight.shape[1], original.get_input_embeddings().weight.shape[0]
    sums, counts = torch.zeros(V, D, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    first = torch.zeros(D, dtype=torch.float64)
    got, kept = {}, []

    def grab(module, args, kwargs):  # record the layer's input, then end the pass: later layers are not needed
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    hook = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x in tqdm(rows.split(batch), desc="calibrating", unit="batch", leave=False):
            try:
                original(input_ids=x, use_cache=False)
            except _Stop:
                pass
            h = got.pop("h").double()                                              # (b, T, D)
            sums.index_add_(0, x.flatten(), h.flatten(0, 1))
            counts.index_add_(0, x.flatten(), torch.ones(x.numel(), dtype=torch.float64))
            first += h[:, 0].sum(0)
            if keep:
                kept.append(h.float())
    finally:
        hook.remove()
    return SplitStats(sums, counts, first / rows.shape[0], rows.numel(), torch.cat(kept) if keep else None)


class _Stop(Exception):
    """Raised by the calibration hook to end a forward pass at the split layer."""


def contextual_table(embed: torch.Tensor, stats: SplitStats) -> torch.Tensor:
    """(V, D) input table: mean split-layer state for seen tokens, a ridge-regression map of the embedding otherwise.

    The map is fitted on the seen tokens, frequent ones weighing more (up to 50 occurrences); the small ridge keeps
    it defined when calibration saw fewer distinct tokens than the hidden size."""
    E = embed.double()
    seen = stats.counts > 0
    if not seen.any():
        raise BlockformerError("the calibration text produced no tokens")
    mean = stats.sums[seen] / stats.counts[seen, None]
    X = E[seen] * stats.counts[seen].clamp(max=50).sqrt()[:, None]
    Y = mean * stats.counts[seen].clamp(max=50).sqrt()[:, None]
    gram = X.T @ X
    ridge = 1e-3 * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(E.shape[1], dtype=E.dtype)
    W = torch.linalg.solve(gram + ridge, X.T @ Y)                                 # (D, D)
    table = E @ W
    table[seen] = mean
    return table


@torch.no_grad()
def apply_contextual(model, stats: SplitStats, embedder_mix: float = 0.0) -> None:
    """Set the three contextual parts of a freshly converted model (in place)."""
    td, dtype = model.token_decoder, model.lm_head.weight.dtype
    if model.config.tie_word_embeddings:  # keep the original output embeddings in the head
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    table = contextual_table(td.embed.weight, stats)
    scale = model.config.embedding_scale  # Gemma multiplies every lookup: store states / scale so lookups are states
    td.embed.weight.copy_((table if scale is None else table / torch.tensor(scale, dtype=dtype).double()).to(dtype))
    D = td.embed.weight.shape[1]
    td.expand.weight[:D] = 0  # slot 0: a constant sink, whatever the context
    td.expand.bias[:D] = stats.first.to(dtype)
    proj, L = model.embedder.proj, model.config.block_length
    eye = torch.eye(D, dtype=dtype)
    proj.weight.copy_(torch.cat([eye * embedder_mix] * (L - 1) + [eye], dim=1))  # (D, L_B * D): [a I, ..., a I, I]
    proj.bias.zero_()


@torch.no_grad()
def fit_bridge(model, rows: torch.Tensor, states: torch.Tensor, batch: int = 4) -> float:
    """Local token inputs: fit the bridge (ridge regression) so that table entry + bridge(local state) is closest to
    the original's split-layer state, over the calibration tokens cut into blocks from position 0 (the row's first
    token, the attention sink, left out of each row). Returns the share of the table's squared error it removes."""
    td, L, D = model.token_decoder, model.config.block_length, model.config.hidden_size
    n = (rows.shape[1] // L) * L
    gram, cross = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    before = torch.zeros((), dtype=torch.float64)
    for x, h in zip(rows[:, :n].split(batch), states[:, :n].split(batch)):
        blocks = x.unflatten(1, (-1, L))                                            # (b, N, L_B)
        X = model.embedder.states(blocks, torch.ones_like(blocks, dtype=torch.bool))[:, :, :-1]   # inputs only
        Y = h.unflatten(1, (-1, L))[:, :, :-1].to(X.dtype) - scaled_lookup(td.embed, blocks[:, :, :-1], td.scale)
        X, Y = (t.flatten(1, 2)[:, 1:].flatten(0, 1).double() for t in (X, Y))  # (b * (N(L_B-1) - 1), D)
        gram += X.T @ X
        cross += X.T @ Y
        before += Y.pow(2).sum()
    W = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(D, dtype=gram.dtype), cross)  # (D, D)
    # residual after the fit, from the normal equations: |Y|^2 - 2 tr(W' X'Y) + tr(W' X'X W)
    after = before - 2 * (W * cross).sum() + (W * (gram @ W)).sum()
    td.bridge.weight.copy_(W.T.to(td.bridge.weight.dtype))
    return float(1 - after / before)


def contextual_init(model, original, fam: Family, tokenizer, data: str, docs: list[str], n_tokens: int,
                    seq_len: int = 512, embedder_mix: float = 0.0) -> dict:
    """Calibrate on `docs` (read from `data`) and apply; returns what the conversion records in its summary."""
    first_token_layer = model.config.provenance["token_layers_from"]
    if not first_token_layer:
        raise BlockformerError("--init contextual needs at least one layer in the token decoder")
    seq_len = min(seq_len, getattr(original.config, "max_position_embeddings", seq_len) or seq_len)
    rows = calibration_rows(tokenizer, docs, n_tokens, seq_len)
    bridge = model.token_decoder.bridge is not None
    stats = split_stats(original, fam, first_token_layer[0], rows, keep=bridge)
    apply_contextual(model, stats, embedder_mix)
    extra = {"bridge_error_removed": round(fit_bridge(model, rows, stats.states), 4)} if bridge else {}
    return {**extra, "init": "contextual", "calib_data": data, "calib_tokens": stats.tokens,
            "embedder_mix": embedder_mix,
            "calib_distinct_tokens": int((stats.counts > 0).sum()), "split_layer": first_token_layer[0]}
