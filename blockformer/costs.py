"""Cost model: FLOPs and memory bytes of generation, for the original and the Block Transformer.

Per phase, time = max(FLOPs / peak FLOP/s, bytes / bandwidth) (a roofline), with both rates measured on the
device the bench runs on (GPU or CPU). Bytes count parameters read (once per decoding step, shared by the batch)
and KV cache read and written; FLOPs count the matrix products (2 per multiply-add) and attention. The prediction
ignores framework overhead, which is exactly what the measurement adds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """What the cost model needs to know about one decoder stack."""
    layers: int
    layer_params: int      # parameters of one decoder layer
    kv_per_pos: int        # KV bytes per cached position of one layer
    attn_dim: int          # heads * head_dim


def layer_shape(cfg, n_layers: int, dtype_bytes: int) -> Shape:
    D, I, H, Hkv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    mlp = (3 if getattr(cfg, "mlp_type", "gated") == "gated" else 2) * D * I
    return Shape(n_layers, D * (H + 2 * Hkv) * hd + H * hd * D + mlp, 2 * Hkv * hd * dtype_bytes, H * hd)


# --------------------------------------------------------------------------------------------- KV accounting
def kv_bytes_per_position(cfg, bytes_el: int) -> int:
    """K and V of one cached position in one layer (a Block Transformer config or an original's generic fields)."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_el


def block_kv_bytes(cfg, context: int, bytes_el: int) -> int:
    """KV cache of one sequence in a Block Transformer holding `context` tokens, as generation allocates it: the
    block decoder caches one position per block, the token decoder only its window (prefix + L_B - 1)."""
    per = kv_bytes_per_position(cfg, bytes_el)
    window = cfg.prefix_length + cfg.block_length - 1
    return per * (cfg.num_block_layers * math.ceil(context / cfg.block_length) + cfg.num_token_layers * window)


def original_kv_bytes(hf_config, context: int, bytes_el: int) -> int:
    """KV cache of one sequence in the original holding `context` tokens (every layer, every position), read through
    the family adapter table, so multi-query Falcon, GPT-2's names or Gemma's head_dim count right."""
    from types import SimpleNamespace
    from .families import family_for
    arch = family_for(hf_config.model_type).arch(hf_config)
    heads = arch["num_attention_heads"]
    shape = SimpleNamespace(num_key_value_heads=arch.get("num_key_value_heads") or heads,
                            head_dim=arch.get("head_dim") or arch["hidden_size"] // heads)
    layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer
    return kv_bytes_per_position(shape, bytes_el) * layers * context


def stack_cost(s: Shape, new: int, ctx: float, B: int, bytes_el: int) -> tuple[float, float]:
    """FLOPs and bytes for `new` positions per row attending to `ctx` positions on average, batch B, one call."""
    flops = s.layers * B * new * (2 * s.layer_params + 4 * s.attn_dim * ctx)
    data = s.layers * (s.layer_params * bytes_el + B * (ctx + new) * s.kv_per_pos)
    return flops, data


def predict(cfg_block, P: int, G: int, B: int, bytes_el: int, peak_flops: float, bandwidth: float,
            decode_bandwidth: float | None = None) -> dict:
    """Predicted seconds for the original and the block model generating G tokens after a P-token prompt.

    Costs are linear in the context, so each decoding phase is costed at its mean context. Decoding steps multiply
    only B rows by each weight matrix; `decode_bandwidth` is the weight-streaming rate such skinny products reach
    (`skinny_bandwidth`, measured at this batch), far below a copy's on a CPU; by default the copy bandwidth.
    """
    decode_bandwidth = decode_bandwidth or bandwidth
    c, L, p = cfg_block, cfg_block.block_length, cfg_block.prefix_length
    head, emb = c.hidden_size * c.vocab_size, L * c.hidden_size * c.hidden_size
    k = c.embedder_layers                 # the original's lowest layers, run by the embedder inside each block
    w = L + c.embedder_sink               # ... over the block's tokens (and the sink); 0 layers cost nothing
    orig = layer_shape(c, k + c.num_block_layers + c.num_token_layers, bytes_el)
    bd, td, loc = (layer_shape(c, n, bytes_el) for n in (c.num_block_layers, c.num_token_layers, k))

    def t(stack, new, ctx, extra, rows=1, step=True, batch=B):  # a stack call plus `extra` parameters on `rows` positions
        f, b = stack_cost(stack, new, ctx, batch, bytes_el)
        bw = decode_bandwidth if step else bandwidth  # a decoding step streams weights for B rows only
        return max((f + 2 * batch * rows * extra) / peak_flops, (b + extra * bytes_el) / bw)

    vanilla = t(orig, P, P / 2, head, step=False) + G * t(orig, 1, P + G / 2, head)  # head on the last position
    nb = P / L
    block = t(bd, round(nb), nb / 2, emb, round(nb), step=False)            # block-level prefill only
    block += t(loc, w, w / 2, 0, step=False, batch=B * round(nb))          # every block's local layers
    per_block = (t(bd, 1, nb + G / (2 * L), emb)                            # one block-decoder step
                 + t(loc, w, w / 2, 0)                                      # the finished block's local layers
                 + t(td, p, p / 2, head)                                    # prefix -> first token
                 + (L - 1) * t(td, 1, p + L / 2, head))                     # the block's other tokens
    if c.local_token_inputs:  # each decoded token's input reruns the local layers on its block so far (+ bridge)
        per_block += sum(t(loc, j + c.embedder_sink, (j + c.embedder_sink) / 2, c.hidden_size ** 2)
                         for j in range(1, L))
    block += per_block * G / L
    return {"original_s": vanilla, "block_s": block, "speedup": vanilla / block}


def machine_rates(dtype=torch.float32, device="cpu", seconds: float = 1.0) -> tuple[float, float]:
    """Measured matmul FLOP/s and memory bandwidth (bytes/s) of `device`, the one the bench runs on.

    Accelerators get larger operands, so that kernels are not launch-bound and copies do not fit in the cache.
    """
    n, mib = (1024, 64) if torch.device(device).type == "cpu" else (4096, 256)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, 4 * n, dtype=dtype, device=device)
    flops = _rate(lambda: a @ b, 2 * n * n * 4 * n, seconds, device)
    big = torch.empty(mib * 2**20 // a.element_size(), dtype=dtype, device=device)
    dst = torch.empty(big.numel(), dtype=dtype, device=device)
    bw = _rate(lambda: dst.copy_(big), 2 * big.numel() * big.element_size(), seconds, device)
    return flops, bw


def skinny_bandwidth(rows: int, dtype=torch.float32, device="cpu", seconds: float = 0.5) -> float:
    """Weight bytes per second streamed by (rows x n) @ (n x 4n) products, the shape of a decoding step at batch
    `rows`; the weight (64 MiB in fp32) does not fit in a cache, so this is what decoding can reach."""
    n = 2048 if torch.device(device).type == "cpu" else 4096
    x = torch.randn(rows, n, dtype=dtype, device=device)
    w = torch.randn(4 * n, n, dtype=dtype, device=device)
    return _rate(lambda: torch.nn.functional.linear(x, w), w.numel() * w.element_size(), seconds, device)


def synchronize(device) -> None:
    """Wait for the device's queued work (kernels run asynchronously on GPUs), so a clock read means it is done."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def _rate(fn, work: float, seconds: float, device="cpu") -> float:
    fn()
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # kernels queue up on a GPU; the final sync waits for all of them
        fn()
        n += 1
    synchronize(device)
    return work * n / (time.perf_counter() - t0)
