"""Fast batched generation for Block Transformers.

    python -c "import blockformer, torch; from transformers import AutoModelForCausalLM as A; \
m = A.from_pretrained('out/smollm2-block'); print(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8))"

The prompt of every row is left-padded so that it ends on a block boundary (the paper's generation convention, and
what `forward(..., anchor=last prompt token)` computes). Then:
  1. the block decoder runs once over the prompt's blocks (a block-level prefill; the token decoder needs none);
  2. per new block, the expansion layer turns the latest context embedding into the prefix, and the token decoder
     decodes the block's tokens one by one with a local cache of `prefix_length + L_B - 1` positions;
  3. the finished block is embedded and the block decoder advances by one step.
All caches are allocated once per call and written in place. Per-layer sliding windows apply as in the full forward:
in blocks (ceil(window / L_B)) over the block decoder's cache, in positions over the token decoder's local window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BlockformerError
from .layers import KVCache


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: greedy, or temperature / top-k / top-p sampling."""
    if not s.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(s.temperature, 1e-5)
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > s.top_p  # keep the nucleus
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


class _Caches:
    """Attach preallocated caches to the attention modules for one call; detach them afterwards."""

    def __init__(self, stack, batch: int, length: int, cfg, dtype, device):
        self.attns = [layer.attn for layer in stack.layers]
        for a in self.attns:
            a.cache = KVCache(batch, cfg.num_key_value_heads, length, cfg.head_dim, dtype, device)

    def close(self):
        for a in self.attns:
            a.cache = None


def layout_prompts(input_ids, attention_mask, L: int):
    """Right-align each row's real tokens so that every prompt ends on the same block boundary.

    Returns ids (B, W) with W a multiple of L, the token mask, and the number of real tokens per row.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    n = mask.sum(1)
    if int(n.min()) < 1:
        raise BlockformerError("empty prompt: every row needs at least one token")
    W = math.ceil(int(n.max()) / L) * L
    ids = input_ids.new_zeros(input_ids.shape[0], W)
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        real = input_ids[b][mask[b]]
        ids[b, W - len(real):], tmask[b, W - len(real):] = real, True
    return ids, tmask, n


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id="config", pad_token_id: int | None = None, streamer=None, seed: int | None = None,
             **_) -> torch.Tensor:
    """Hugging Face-style `generate`: returns `input_ids` followed by the new tokens (B, T + max_new_tokens).

    `eos_token_id`: an id or a list of ids ending a sequence (default: the config's); None never stops early.
    Finished rows are filled with `pad_token_id`. A `streamer` (e.g. transformers' TextStreamer) gets the prompt
    first, then each new token (B, 1), then `end()`, as HF `generate` calls it.
    """
    cfg, L, p = model.config, model.config.block_length, model.config.prefix_length
    if max_new_tokens < 1:
        raise BlockformerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if input_ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise BlockformerError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                               f"model's context of {cfg.max_position_embeddings} tokens")
    eos = _eos_set(cfg.eos_token_id if eos_token_id == "config" else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    ids, tmask, _ = layout_prompts(input_ids, attention_mask, L)
    B, dev, dtype = ids.shape[0], ids.device, model.lm_head.weight.dtype
    n_prompt_blocks, n_new_blocks = ids.shape[1] // L, math.ceil(max_new_tokens / L)
    bd, td = model.block_decoder, model.token_decoder
    block_caches = _Caches(bd, B, n_prompt_blocks + n_new_blocks, cfg, dtype, dev)
    token_caches = _Caches(td, B, p + L - 1, cfg, dtype, dev)
    try:
        if streamer is not None:  # HF's convention: the first put() is the prompt (TextStreamer's skip_prompt drops it)
            streamer.put(input_ids.cpu())
        ctx, state = _prefill(model, ids, tmask)
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        local = _local_tables(td, p + L - 1, dtype, dev)
        for j in range(n_new_blocks):
            block = _decode_block(model, ctx, local, min(L, max_new_tokens - j * L), sampling, gen)  # (B, <=L)
            for k in range(block.shape[1]):
                tok = torch.where(done, torch.full_like(block[:, k], pad), block[:, k])
                out[:, j * L + k] = tok
                done |= _is_eos(tok, eos)
                if streamer is not None:
                    streamer.put(tok[:, None].cpu())
            if bool(done.all()) or j == n_new_blocks - 1:
                break
            ctx = _advance(model, out[:, j * L:(j + 1) * L], state)
    finally:
        block_caches.close()
        token_caches.close()
        if streamer is not None:
            streamer.end()
    return torch.cat([input_ids, out], 1)


def _eos_set(eos) -> set[int]:
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}


def _is_eos(tok, eos: set[int]):
    hit = torch.zeros_like(tok, dtype=torch.bool)
    for e in eos:
        hit |= tok == e
    return hit


class _BlockState:
    """Where the block decoder stands: next cache slot, per-row next position, valid key slots."""

    def __init__(self, valid: torch.Tensor, next_pos: torch.Tensor, slot: int):
        self.valid, self.next_pos, self.slot = valid, next_pos, slot


def _prefill(model, ids, tmask):
    L = model.config.block_length
    blocks, bmask = ids.unflatten(1, (-1, L)), tmask.unflatten(1, (-1, L))   # (B, N, L_B)
    real = bmask.any(-1)                                                     # (B, N)
    n_slots = model.block_decoder.layers[0].attn.cache.k.shape[2] if model.block_decoder.layers else real.shape[1]
    valid = torch.zeros(ids.shape[0], n_slots, dtype=torch.bool, device=ids.device)
    valid[:, : real.shape[1]] = real
    cache_at = (torch.arange(real.shape[1], device=ids.device), real.shape[1])
    h = model.block_decoder(model.embedder(blocks, bmask), real, cache_at)  # (B, N, D)
    state = _BlockState(valid, real.long().sum(1, keepdim=True), real.shape[1])
    return h[:, -1], state


def _advance(model, block_tokens, state: _BlockState):
    """Embed a finished block (B, L_B) and run one block-decoder step; returns the new context (B, D)."""
    bd = model.block_decoder
    x = model.embedder(block_tokens[:, None], torch.ones_like(block_tokens[:, None], dtype=torch.bool))  # (B, 1, D)
    if bd.wpe is not None:
        x = x + bd.wpe(state.next_pos)
    state.valid[:, state.slot] = True
    S = state.slot + 1
    mask = state.valid[:, None, None, :S]                                  # (B, 1, 1, S)
    # windows count slots: prompts are right-aligned, so slot distance = block distance for every real key
    slots = torch.arange(S, device=x.device)[None]
    masks = bd.masks(mask, slots[:, -1:], slots)
    x = bd.run_layers(x, bd.ropes(state.next_pos, x.dtype), masks, (slots[0, -1:], S))
    state.slot += 1
    state.next_pos = state.next_pos + 1
    return x[:, -1]


def _local_tables(td, T: int, dtype, device):
    """Rope tables and causal masks (per sliding window) of the token decoder's local window, once per call."""
    pos = torch.arange(T, device=device)[None]
    ropes = td.ropes(pos, dtype)
    masks = [td.masks(torch.ones(1, 1, 1, t + 1, dtype=torch.bool, device=device), pos[:, t:t + 1], pos[:, :t + 1])
             for t in range(T)]
    return ropes, masks


def _decode_block(model, ctx, local, n_tokens: int, sampling, gen):
    """Decode up to L_B tokens of the next block from the context embedding (B, D)."""
    td = model.token_decoder
    ropes, masks = local
    x = td.prefix(ctx)                                                       # (B, p, D)
    toks, t = [], 0
    for k in range(n_tokens):
        T = x.shape[1]
        r = {kind: None if rope is None else (rope[0][..., t:t + T, :], rope[1][..., t:t + T, :])
             for kind, rope in ropes.items()}
        if T > 1:  # the prefix: causal (and windowed) among its T positions
            pos = torch.arange(t + T, device=x.device)[None]
            m = td.masks(torch.ones(1, 1, T, t + T, dtype=torch.bool, device=x.device).tril(t), pos[:, t:], pos)
        else:
            m = masks[t]
        x = td.run_layers(x, r, m, (torch.arange(t, t + T, device=x.device), t + T))
        tok = next_token(model.logits(td.norm(x[:, -1])), sampling, gen)  # (B,)
        toks.append(tok)
        t += T
        if k + 1 < n_tokens:
            x = td.embed_tokens(tok[:, None], t)
    return torch.stack(toks, 1)
