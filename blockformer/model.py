"""Block Transformer (Ho et al., NeurIPS 2024, arXiv 2406.02657) for any supported decoder-only family.

Three parts, named as in the paper:
  embedder       -- looks up the L_B token vectors of a block and projects their concatenation to one vector;
  block decoder  -- the lower layers, causal self-attention over block vectors (positions = block index);
  token decoder  -- the upper layers; the block decoder's output for block i is expanded into `prefix_length`
                    vectors that precede the tokens of block i+1, and attention never leaves that short window.

Alignment convention: every row is shifted right so that an *anchor* token closes a block.  By default the anchor
is the first real token (the paper's evaluation convention, `L_B - 1` pads in front): block j's context embedding
then predicts every token of block j+1, and `logits[:, t]` is the distribution of token t+1 for every real position
t, exactly as for a vanilla causal LM.  Generation and log-likelihood scoring anchor the *last prompt token* (the
paper's generation convention: the prompt ends on a block boundary), so a continuation always starts a new block;
then positions inside block 0 before the anchor have no prediction (their logits are undefined).  Pads are masked out of
the embedder (their vectors are zeroed), of attention and of the returned positions' dependencies; positions
count real blocks only, so left padding never changes the logits of the real tokens.

The block decoder has no final norm: its output stays in the original model's residual stream, which is what the
upper layers (the token decoder) were trained to read.  With the paper's initialisation (mean embedder
projection, identity expansion) a `block_length=1` model whose block decoder holds every layer reproduces the
original logits exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .layers import RMSNorm, Rotary, Stack, causal_mask, make_norm, rope_inv_freq


class BlockTransformerConfig(PretrainedConfig):
    """Architecture of the shared decoder layers plus the block-specific knobs.

    The layer fields describe the original family generically (litgpt style); `base_config` keeps the
    original Hugging Face config for provenance and for rope variants that transformers computes.
    """

    model_type = "block_transformer"

    def __init__(self, vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=None,
                 head_dim=None, intermediate_size=256, norm_type="rms", norm_eps=1e-5, mlp_type="gated",
                 hidden_act="silu", parallel_residual=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                 norm_bias=False, rope=None, learned_positions=False, max_position_embeddings=2048,
                 block_length=4, num_block_layers=2, num_token_layers=2, prefix_length=2,
                 base_config=None, provenance=None, tie_word_embeddings=True,
                 norm_offset=0.0, norm_placement="pre", shared_norm=False, qk_norm=None, attn_scale=None,
                 attn_softcap=None, final_softcap=None, embedding_scale=None, lm_head_bias=False,
                 rotary_interleaved=False, position_offset=0, block_windows=None, token_windows=None,
                 local_rope=None, embedder_layers=0, embedder_windows=None, embedder_sink=False,
                 local_token_inputs=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.norm_type, self.norm_eps, self.norm_bias = norm_type, norm_eps, norm_bias
        self.mlp_type, self.hidden_act, self.parallel_residual = mlp_type, hidden_act, parallel_residual
        self.qkv_bias, self.o_bias, self.mlp_bias = qkv_bias, o_bias, mlp_bias
        self.rope = rope  # e.g. {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}
        self.learned_positions, self.max_position_embeddings = learned_positions, max_position_embeddings
        self.block_length, self.prefix_length = block_length, prefix_length
        self.num_block_layers, self.num_token_layers = num_block_layers, num_token_layers
        self.base_config, self.provenance = base_config, provenance or {}
        # family options (issue 12); each default is the Llama behaviour, so older folders load unchanged
        self.norm_offset = norm_offset          # norms scale by (norm_offset + weight): Gemma stores w - 1
        self.norm_placement = norm_placement    # pre | sandwich (Gemma 2/3: also after each branch) | post (OLMo2)
        self.shared_norm = shared_norm          # parallel layers whose two branches read one norm (Phi, GPT-J)
        self.qk_norm = qk_norm                  # None | head (one norm over head_dim) | full (over all heads,
        #                                         OLMo2) | per_head (a norm per head, StableLM)
        self.attn_scale = attn_scale            # softmax scale; None = head_dim ** -0.5 (Gemma 2/3, GPT-Neo differ)
        self.attn_softcap, self.final_softcap = attn_softcap, final_softcap  # cap * tanh(x / cap) (Gemma 2)
        self.embedding_scale = embedding_scale  # token embeddings times this (Gemma: sqrt(hidden_size))
        self.lm_head_bias = lm_head_bias        # Phi, GPT-J
        self.rotary_interleaved = rotary_interleaved  # GPT-J rotates channel pairs (0, 1), (2, 3), ...
        self.position_offset = position_offset  # learned position index = position + offset (OPT: 2)
        # per-layer sliding windows in tokens of the original (None = global); a query at q sees keys k with
        # q - k < window. The block decoder applies ceil(window / block_length) blocks.
        self.block_windows, self.token_windows = block_windows, token_windows
        self.local_rope = local_rope            # rope parameters of windowed layers when they differ (Gemma 3)
        self.embedder_layers = embedder_layers  # the original's lowest layers run inside each block by the embedder
        self.embedder_windows = embedder_windows  # their sliding windows (tokens), as for the two decoders
        self.embedder_sink = embedder_sink      # a learned vector at local position 0, before the block's tokens
        self.local_token_inputs = local_token_inputs  # token decoder's inputs add a map of the embedder's local states
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ------------------------------------------------------------------------------------------ the three parts
class Embedder(nn.Module):
    """Lookup of the block's L_B token vectors, then a linear map of their concatenation (init: the mean).

    With `embedder_layers` k > 0 the original's k lowest layers run in between, at token level and causally inside
    the block only: each token leaves them with about the state the original gives it at layer k (the lowest layers
    read mostly nearby tokens), which is what the block decoder (the original's layers k..) was trained to read.
    Stateless per block, so prefill, a decoding step and scoring call it alike (bench/local_embedder.py). With
    `embedder_sink` a learned vector (init: BOS) opens every block's window, as BOS opens a text: the block's first
    token is then an ordinary position rather than the window's attention sink, so its state can be mixed in."""

    def __init__(self, cfg: BlockTransformerConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.local = Stack(cfg, cfg.embedder_layers, cfg.embedder_windows) if cfg.embedder_layers else None
        self.sink = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.embedder_layers and cfg.embedder_sink else None
        self.proj = nn.Linear(cfg.block_length * cfg.hidden_size, cfg.hidden_size)
        self.scale = cfg.embedding_scale

    def forward(self, blocks, block_tok_mask, with_states=False):  # (B, N, L_B) ids and bool mask -> (B, N, D)
        e = self.states(blocks, block_tok_mask)                                # (B, N, L_B, D)
        v = self.proj(e.flatten(-2))
        return (v, e) if with_states else v

    def states(self, blocks, block_tok_mask):  # (B, N, T <= L_B) -> (B, N, T, D): each token's state, pads 0
        e = scaled_lookup(self.embed, blocks, self.scale)
        if self.local is not None:
            e = self.contextualise(e, block_tok_mask)
        return e * block_tok_mask[..., None].to(e.dtype)                       # pads enter the projection as 0

    def contextualise(self, e, mask):  # (B, N, L_B, D) -> (B, N, L_B, D): the states entering layer k
        B, N, L, D = e.shape
        x, valid = e.flatten(0, 1), mask.flatten(0, 1)                         # (B*N, L_B, D): one row per block
        if self.sink is not None:                                              # (B*N, 1 + L_B, D)
            x = torch.cat([self.sink.to(x.dtype).expand(B * N, 1, D), x], 1)
            valid = torch.cat([valid.new_ones(B * N, 1), valid], 1)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)                       # left pads: the first real token at 0
        if self.local.wpe is not None:
            x = x + self.local.wpe(pos)
        return self.local.run(x, pos, causal_mask(valid))[:, -L:].reshape(B, N, L, D)


class BlockDecoder(Stack):
    """Causal self-attention over block vectors; its output for block i is the context embedding of block i+1."""

    def __init__(self, cfg: BlockTransformerConfig, n_layers: int):
        # a window of w tokens becomes ceil(w / L_B) blocks: with L_B = 1 it is the original's window exactly
        L = cfg.block_length
        super().__init__(cfg, n_layers, [None if w is None else -(-w // L) for w in cfg.block_windows or []])

    def forward(self, x, block_mask, cache_at=None):  # x: (B, N, D); block_mask: (B, N) bool
        pos = (block_mask.long().cumsum(-1) - 1).clamp(min=0)  # real-block index: left padding is invisible
        if self.wpe is not None:
            x = x + self.wpe(pos)
        # no padding: None = plain causal attention, which SDPA runs with its causal kernel; any bool mask sends it
        # to a slower path (prefill of 8 x 1024 positions took twice as long on a CPU)
        plain = not block_mask.is_meta and bool(block_mask.all())  # meta tensors (shape dry runs) hold no values
        return self.run(x, pos, None if plain else causal_mask(block_mask), cache_at)

    def prefill(self, x, block_mask) -> tuple[torch.Tensor, "BlockCursor"]:
        """Run the prompt's blocks (B, N, D) through the preallocated cache; the cursor tracks where it stands."""
        B, N, _ = x.shape
        n_slots = self.layers[0].attn.cache.k.shape[2] if self.layers else N
        valid = torch.zeros(B, n_slots, dtype=torch.bool, device=x.device)
        valid[:, :N] = block_mask
        h = self(x, block_mask, (torch.arange(N, device=x.device), N))               # (B, N, D)
        return h[:, -1], BlockCursor(valid, block_mask.long().sum(1, keepdim=True), N)

    def step(self, x, cur: "BlockCursor"):
        """One new block vector (B, 1, D) at the cursor's slot -> its context embedding (B, D)."""
        if self.wpe is not None:
            x = x + self.wpe(cur.next_pos)
        cur.valid[:, cur.slot] = True
        S = cur.slot + 1
        # windows count slots: prompts are right-aligned, so slot distance = block distance for every real key
        slots = torch.arange(S, device=x.device)[None]
        masks = self.masks(cur.valid[:, None, None, :S], slots[:, -1:], slots)      # (B, 1, 1, S) per window
        x = self.run_layers(x, self.ropes(cur.next_pos, x.dtype), masks, (slots[0, -1:], S))
        cur.slot, cur.next_pos = S, cur.next_pos + 1
        return x[:, -1]

    def tree(self, x, pos, mask):
        """Blocks (B, S, D) at explicit positions (B, S) under an explicit mask (B, 1, S, S): shared-context scoring."""
        return self.run(x if self.wpe is None else x + self.wpe(pos), pos, mask)


@dataclass
class BlockCursor:
    """Where the block decoder's cache stands: valid key slots (B, S), each row's next position (B, 1), next slot."""
    valid: torch.Tensor
    next_pos: torch.Tensor
    slot: int


class TokenDecoder(Stack):
    """Decodes block i+1 from [prefix(context_i), tokens of block i+1]; attention stays inside that window."""

    def __init__(self, cfg: BlockTransformerConfig, n_layers: int):
        super().__init__(cfg, n_layers, cfg.token_windows)  # windows in local positions (prefix included)
        self.p = cfg.prefix_length
        self.expand = nn.Linear(cfg.hidden_size, self.p * cfg.hidden_size)  # init: stacked identities
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # local token inputs: a token's input adds a linear map of its embedder state (the original's lowest layers
        # run inside its block, so it knows the block's earlier tokens); init 0: the table-only model at first
        self.bridge = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False) if cfg.local_token_inputs else None
        self.norm = make_norm(cfg)
        self.scale = cfg.embedding_scale
        self.tables = None  # rope tables and masks of the local window while a generation's caches are set up

    def prefix(self, ctx):  # (..., D) -> (..., p, D)
        return self.expand(ctx).unflatten(-1, (self.p, -1))

    def embed_tokens(self, ids, offset: int, local=None):  # ids: (B', T) local ids from local position `offset`
        x = scaled_lookup(self.embed, ids, self.scale)
        if self.bridge is not None:  # local: (B', T, D) the tokens' embedder states
            x = x + self.bridge(local)
        if self.wpe is not None:  # absolute positions go on token inputs only: prefixes are residual states
            x = x + self.wpe.rows(offset, ids.shape[1])
        return x

    def forward(self, ctx, nxt, nxt_mask, local=None):  # ctx: (B, N, D); nxt: (B, N, L_B-1) ids of the next block
        B, N, D = ctx.shape                                                   # local: (B, N, L_B-1, D) their states
        tok = self.embed_tokens(nxt.flatten(0, 1), self.p, None if local is None else local.flatten(0, 1))
        x = torch.cat([self.prefix(ctx), tok.view(B, N, -1, D)], 2)
        x = x.flatten(0, 1)                                                   # (B*N, p + L_B - 1, D)
        valid = torch.cat([nxt_mask.new_ones(B, N, self.p), nxt_mask], 2).flatten(0, 1)
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.run(x, pos, causal_mask(valid))
        return h[:, self.p - 1:].unflatten(0, (B, N))                       # (B, N, L_B, D)

    def setup_cache(self, batch: int, length: int, dtype, device) -> None:
        """The local window's cache, plus its rope tables and per-step masks (the same for every block)."""
        super().setup_cache(batch, length, dtype, device)
        pos = torch.arange(length, device=device)[None]
        one = [torch.ones(1, 1, 1, t + 1, dtype=torch.bool, device=device) for t in range(length)]
        self.tables = (self.ropes(pos, dtype), [self.masks(m, pos[:, t:t + 1], pos[:, :t + 1]) for t, m in enumerate(one)])

    def release_cache(self) -> None:
        super().release_cache()
        self.tables = None

    def decode(self, ctx, n_tokens: int, next_token, local_state=None) -> torch.Tensor:
        """Decode up to L_B tokens from the context embedding (B, D); `next_token(h (B, D)) -> (B,)` picks each;
        with local token inputs `local_state(block's tokens so far (B, k)) -> (B, 1, D)` gives the last one's state."""
        ropes, masks = self.tables
        x, toks, t = self.prefix(ctx), [], 0                                  # (B, p, D)
        for k in range(n_tokens):
            T = x.shape[1]
            r = {kind: None if rope is None else (rope[0][..., t:t + T, :], rope[1][..., t:t + T, :])
                 for kind, rope in ropes.items()}
            if T > 1:  # the prefix: causal (and windowed) among its T positions
                pos = torch.arange(t + T, device=x.device)[None]
                m = self.masks(torch.ones(1, 1, T, t + T, dtype=torch.bool, device=x.device).tril(t), pos[:, t:], pos)
            else:
                m = masks[t]
            x = self.run_layers(x, r, m, (torch.arange(t, t + T, device=x.device), t + T))
            toks.append(next_token(self.norm(x[:, -1])))                      # (B,)
            t += T
            if k + 1 < n_tokens:
                loc = None if self.bridge is None else local_state(torch.stack(toks, 1))   # (B, 1, D)
                x = self.embed_tokens(toks[-1][:, None], t, loc)
        return torch.stack(toks, 1)                                           # (B, n_tokens)


# ------------------------------------------------------------------------------------------------- the model
class BlockTransformerForCausalLM(PreTrainedModel):
    config_class = BlockTransformerConfig
    base_model_prefix = "block_transformer"
    _tied_weights_keys = {"lm_head.weight": "token_decoder.embed.weight"}
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: BlockTransformerConfig):
        super().__init__(config)
        self.embedder = Embedder(config)
        self.block_decoder = BlockDecoder(config, config.num_block_layers)
        self.token_decoder = TokenDecoder(config, config.num_token_layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()
        init_mean_projection(self.embedder)  # after post_init, which would overwrite them with noise
        init_identity_expansion(self.token_decoder)
        if self.token_decoder.bridge is not None:  # 0: the same model as without local inputs until trained
            nn.init.zeros_(self.token_decoder.bridge.weight)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Batched generation (greedy or sampling); see `blockformer.generate.generate` for the options."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------------------- decoding (gpt-fast style)
    def setup_caches(self, batch: int, n_blocks: int, dtype=None, device=None) -> None:
        """Preallocate the block decoder's cache (`n_blocks` slots) and the token decoder's local one."""
        dtype, device = dtype or self.lm_head.weight.dtype, device or self.lm_head.weight.device
        c = self.config
        self.block_decoder.setup_cache(batch, n_blocks, dtype, device)
        self.token_decoder.setup_cache(batch, c.prefix_length + c.block_length - 1, dtype, device)

    def release_caches(self) -> None:
        self.block_decoder.release_cache()
        self.token_decoder.release_cache()

    def compile_decoding(self, enabled: bool = True) -> None:
        """Compile the token decoder's step (inductor, static shapes: its window has p + L_B - 1 slots, so a few
        graphs); `enabled=False` goes back to eager. Measured 1.14x at batch 8 on a 2-core CPU after an 82 s first
        call (`bench/compile_decode.py`); the block decoder's step stays eager, its cache grows each block."""
        td = self.token_decoder
        td.__dict__.pop("run_layers", None)  # the instance attribute shadows Stack.run_layers
        if enabled:
            td.run_layers = torch.compile(td.run_layers, dynamic=False)

    def prefill(self, ids, tmask) -> tuple[torch.Tensor, BlockCursor]:
        """Prompt ids (B, W) right-aligned on a block boundary (W a multiple of L_B) -> context (B, D), cursor."""
        L = self.config.block_length
        blocks, bmask = ids.unflatten(1, (-1, L)), tmask.unflatten(1, (-1, L))     # (B, N, L_B)
        return self.block_decoder.prefill(self.embedder(blocks, bmask), bmask.any(-1))

    def advance(self, block_tokens, cur: BlockCursor) -> torch.Tensor:
        """A finished block (B, L_B) -> the next context embedding (B, D); one block-decoder step."""
        x = self.embedder(block_tokens[:, None], torch.ones_like(block_tokens[:, None], dtype=torch.bool))
        return self.block_decoder.step(x, cur)                                       # x: (B, 1, D)

    def decode_block(self, ctx, n_tokens: int, pick) -> torch.Tensor:
        """The next block's first `n_tokens` tokens (B, n) from its context (B, D); `pick(logits (B, V)) -> (B,)`."""
        return self.token_decoder.decode(ctx, n_tokens, lambda h: pick(self.logits(h)), self.last_local_state)

    def last_local_state(self, toks):  # (B, k) the block's tokens so far -> (B, 1, D): the last one's local state
        return self.embedder.states(toks[:, None], torch.ones_like(toks[:, None], dtype=torch.bool))[:, 0, -1:]

    def choices_hidden(self, ctx, cmask, conts, xmask):
        """Scoring several continuations of one context (anchored on its last token): the context runs once.

        ctx (B, Nc*L_B) left-padded so that its last token closes a block; conts (B, n, K*L_B) right-padded.
        Returns normalised hidden states (B, n, K*L_B, D): [b, j, t] predicts token t of continuation j. The block
        decoder reads [context blocks, each continuation's first K-1 blocks] once, under a tree mask (a
        continuation's block sees the context and its own earlier blocks): a plain forward's attention exactly."""
        L, (B, n, Tx), Nc = self.config.block_length, conts.shape, ctx.shape[1] // self.config.block_length
        K = Tx // L
        xb, xbm = conts.unflatten(2, (K, L)), xmask.unflatten(2, (K, L))              # (B, n, K, L_B)
        blocks = torch.cat([ctx.unflatten(1, (Nc, L)), xb[:, :, :-1].flatten(1, 2)], 1)   # (B, Nc + n(K-1), L_B)
        bmask = torch.cat([cmask.unflatten(1, (Nc, L)), xbm[:, :, :-1].flatten(1, 2)], 1)
        grp, idx, see = choice_tree(Nc, n, K, ctx.device)
        # a slot runs when it is a real context block or a choice block followed by another (its context is used)
        valid = torch.cat([bmask[:, :Nc].any(-1), xbm[:, :, 1:, 0].flatten(1)], 1)  # (B, S)
        pos = torch.where(grp < 0, (valid.long().cumsum(1) - 1).clamp(min=0), valid[:, :Nc].sum(1, keepdim=True) + idx)
        keep = packed(valid)               # (B, S'): padding blocks (short choices, short contexts) left out
        see, valid = see[keep[:, :, None], keep[:, None, :]], valid.gather(1, keep)   # (B, S', S'), (B, S')
        eye = torch.eye(keep.shape[1], dtype=torch.bool, device=ctx.device)
        v, states = self.embedder(gather_slots(blocks, keep), gather_slots(bmask, keep), with_states=True)
        e = self.block_decoder.tree(v, pos.gather(1, keep), ((see & valid[:, None]) | eye)[:, None])  # (B, S', D)
        e, S = scatter_slots(e, keep, blocks.shape[1]), blocks.shape[1]
        last = e[:, Nc - 1, None, None].expand(B, n, 1, -1)                             # context of block 0
        ctxs = torch.cat([last, e[:, Nc:].unflatten(1, (n, K - 1))], 2)                 # (B, n, K, D)
        sel = xbm[..., 0]                                 # (B, n, K): blocks that hold scored tokens, no padding
        td, h = self.token_decoder, ctxs.new_zeros(B, n, K, L, ctxs.shape[-1])
        loc = None if td.bridge is None else \
            self.choice_states(scatter_slots(states, keep, S)[:, Nc:], xb, xbm)[sel][None, :, :-1]
        h[sel] = td.norm(td(ctxs[sel][None], xb[..., :-1][sel][None], xbm[..., :-1][sel][None], loc)[0])
        return h.flatten(2, 3)                                                        # (B, n, K*L_B, D)

    def choice_states(self, first, xb, xbm):
        """Local states of every continuation block (B, n, K, L_B, D), zeros past a choice's end: all but its last
        real block come from the block decoder's pass (`first`, (B, n(K-1), L_B, D)); only the last one runs again."""
        B, n, K, L = xb.shape
        at = (xbm[..., 0].sum(-1) - 1)[:, :, None, None]                               # (B, n, 1, 1) last real block
        pick = lambda t: t.gather(2, at.expand(-1, -1, 1, L))[:, :, 0]  # noqa: E731 - (B, n, L_B)
        last = self.embedder.states(pick(xb), pick(xbm))                                # (B, n, L_B, D)
        out = torch.cat([first.unflatten(1, (n, K - 1)), first.new_zeros(B, n, 1, *first.shape[2:])], 2)
        return out.scatter(2, at[..., None].expand(-1, -1, 1, L, out.shape[-1]), last[:, :, None])

    def get_input_embeddings(self):
        return self.token_decoder.embed

    def get_output_embeddings(self):
        return self.lm_head

    def parameter_counts(self) -> dict:
        """Parameters per part; a tied LM head counts once, under the token decoder's embeddings."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        head = 0 if self.lm_head.weight is self.token_decoder.embed.weight else count(self.lm_head)
        parts = {"embedder": count(self.embedder), "block_decoder": count(self.block_decoder),
                 "token_decoder": count(self.token_decoder), "lm_head": head}
        return {**parts, "total": sum(parts.values())}

    def kv_cache_bytes(self, context: int) -> int:
        """KV-cache bytes of one sequence holding `context` tokens (blockformer/costs.py owns the accounting)."""
        from .costs import block_kv_bytes
        return block_kv_bytes(self.config, context, self.lm_head.weight.element_size())

    @torch.no_grad()
    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, Rotary):  # non-persistent: rebuilt after from_pretrained's meta-device load
            module.inv_freq.copy_(rope_inv_freq(self.config, module.local)[0])
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.constant_(module.weight, 1.0 - getattr(module, "offset", 0.0))  # scale 1 (Gemma stores w - 1)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, labels=None, anchor=None, return_hidden=False, **_):
        """Causal-LM forward: `logits[:, t]` is the distribution of token t+1.

        `anchor` (B,) optionally names, per row, the input position that must close a block (default: the first
        real token). Scoring and generation anchor the last prompt token, so a continuation starts a new block.
        `return_hidden` skips the LM head and returns `hidden_states=(final hidden (B, T, D), block-decoder
        output (B, N, D), per-row shift (B,))`, for losses computed in chunks over the vocabulary.
        """
        if return_hidden:
            return CausalLMOutput(hidden_states=self.final_hidden(input_ids, attention_mask, anchor, True))
        logits = self.logits(self.final_hidden(input_ids, attention_mask, anchor))   # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def logits(self, h):
        """LM head on final hidden states, then Gemma 2's final soft-cap (cap * tanh(logits / cap)) if any."""
        return output_head(self)(h)

    def final_hidden(self, input_ids, attention_mask=None, anchor=None, with_context=False, need=None):
        """Normalised last hidden states (B, T, D), ready for `lm_head`.

        `need` (B, T) bool, optional: only these positions are wanted (scoring). The token decoder then runs only on
        the blocks that hold them (a continuation's few blocks instead of the whole context's); other positions
        come back as zeros. The block decoder still reads every block: the context lives there."""
        L = self.config.block_length
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ids, tmask, shift = align_to_blocks(input_ids, mask, L, anchor)
        blocks, bmask = ids.unflatten(1, (-1, L)), tmask.unflatten(1, (-1, L))      # (B, N, L_B)
        vec, states = self.embedder(blocks, bmask, with_states=True)                  # (B, N, D), (B, N, L_B, D)
        ctx = self.block_decoder(vec, bmask.any(-1))                                 # (B, N, D)
        # block j's token decoder reads the first L_B - 1 tokens of block j+1 (the last block: none, all padding)
        nxt_of = lambda t: torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], 1)[:, :, : L - 1]  # noqa: E731
        nxt, nxt_mask = nxt_of(blocks), nxt_of(bmask)
        loc = None if self.token_decoder.bridge is None else nxt_of(states)  # their local states, as embedded
        idx = prediction_slots(input_ids.shape[1], shift, L)
        if need is None:
            h = self.token_decoder(ctx, nxt, nxt_mask, loc)                           # (B, N, L_B, D)
        else:
            sel = torch.zeros(ctx.shape[:2], dtype=torch.bool, device=ctx.device)     # (B, N) blocks to decode
            rows = torch.arange(len(idx), device=idx.device)[:, None].expand_as(idx)
            sel[rows[need], idx[need] // L] = True
            h = ctx.new_zeros(*ctx.shape[:2], L, ctx.shape[-1])
            h[sel] = self.token_decoder(ctx[sel][None], nxt[sel][None], nxt_mask[sel][None],
                                        None if loc is None else loc[sel][None])[0]
        h = h.flatten(1, 2)                                                           # (B, N*L_B, D)
        h = self.token_decoder.norm(h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1])))  # (B, T, D)
        return (h, ctx, shift) if with_context else h


def choice_tree(Nc: int, n: int, K: int, device):
    """Layout of [Nc context blocks, then K-1 blocks of each of n continuations]: each slot's group (-1: context),
    its index in the group, and which keys each query sees (S, S): the context causally; a continuation's block the
    whole context and its own earlier blocks, never another continuation's."""
    grp = torch.cat([torch.full((Nc,), -1), torch.arange(n).repeat_interleave(K - 1)]).to(device)
    idx = torch.cat([torch.arange(Nc), torch.arange(K - 1).repeat(n)]).to(device)
    earlier = idx[None, :] <= idx[:, None]
    context_key = (grp[None, :] == -1) & ((grp[:, None] >= 0) | earlier)
    own_block = (grp[None, :] == grp[:, None]) & (grp[:, None] >= 0) & earlier
    return grp, idx, context_key | own_block


def packed(valid):  # (B, S) bool -> (B, S') slot indices: each row's valid slots first, in order; S' the most any has
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    return order[:, : int(valid.sum(1).max())]


def gather_slots(t, keep):  # (B, S, ...) -> (B, S', ...)
    return t.gather(1, keep.view(*keep.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


def scatter_slots(t, keep, S: int):  # (B, S', ...) -> (B, S, ...): slots left out hold zeros
    idx = keep.view(*keep.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
    return t.new_zeros(t.shape[0], S, *t.shape[2:]).scatter(1, idx, t)


def scaled_lookup(embed: nn.Embedding, ids, scale):
    """Token vectors times the family's embedding scale (Gemma: sqrt(D), cast to the weights' dtype as HF does)."""
    e = embed(ids)
    return e if scale is None else e * torch.tensor(scale, dtype=e.dtype, device=e.device)


def output_head(model):
    """Final hidden states -> logits, for a Block Transformer or a Hugging Face model of a supported family.

    The LM head, then the final soft-cap (cap * tanh(logits / cap)) where the family has one (Gemma 2): losses and
    scores computed from hidden states in chunks must apply it as the model's own forward does. Works on wrapped
    (LoRA) models too: it reads only the config and the output embeddings."""
    c = model.config
    cap = c.final_softcap if c.model_type == "block_transformer" else getattr(c, "final_logit_softcapping", None)
    head = model.get_output_embeddings()
    return head if cap is None else (lambda h: cap * torch.tanh(head(h) / cap))


def prediction_slots(T: int, shift, L: int):
    """(B, T): where the token decoder's (B, N*L_B) output holds the prediction from each original position.

    The prediction *from* aligned position q sits at slot q - (L_B - 1); block 0's other slots have none (slot 0)."""
    return (torch.arange(T, device=shift.device) + shift[:, None] - (L - 1)).clamp(min=0)


def align_to_blocks(input_ids, mask, L: int, anchor=None):
    """Shift each row right so that its `anchor` token (default: first real token) closes a block.

    Returns the aligned ids (B, N*L), their mask, and the per-row shift (B,).
    """
    B, T = input_ids.shape
    if anchor is None:
        anchor = (mask.long().cumsum(1) == 0).sum(1)           # leading pads = index of the first real token
    shift = (L - 1 - anchor) % L
    width = math.ceil((T + L - 1) / L) * L
    pos = torch.arange(T, device=input_ids.device) + shift[:, None]
    ids = input_ids.new_zeros(B, width).scatter_(1, pos, input_ids)
    tmask = mask.new_zeros(B, width).scatter_(1, pos, mask)
    return ids, tmask, shift


@torch.no_grad()
def init_mean_projection(embedder: Embedder):
    """The paper's embedder init: the block vector starts as the mean of its L_B token vectors."""
    D = embedder.embed.weight.shape[1]
    L = embedder.proj.weight.shape[1] // D
    eye = torch.eye(D, dtype=embedder.proj.weight.dtype, device=embedder.proj.weight.device)
    embedder.proj.weight.copy_(torch.cat([eye / L] * L, dim=1))  # (D, L_B*D)
    embedder.proj.bias.zero_()


@torch.no_grad()
def init_identity_expansion(token_decoder: TokenDecoder):
    """The paper's expansion init: every prefix vector starts as a copy of the context embedding."""
    w = token_decoder.expand.weight
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    w.copy_(torch.cat([eye] * token_decoder.p, dim=0))  # (p*D, D)
    token_decoder.expand.bias.zero_()
