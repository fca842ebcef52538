"""The model card and the terminal summary of a conversion, both made from the summary dict."""
from __future__ import annotations


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _layers(idx: list[int]) -> str:
    if not idx:
        return "none"
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}-{idx[-1]}"
    return ",".join(map(str, idx))


def _embedder_layers(s: dict) -> str:
    """'embedder <- layers 0-1 (inside each block), ' when the embedder runs the original's lowest layers."""
    src = s.get("embedder_layers_from")
    return f"embedder <- layers {_layers(src)} (inside each block), " if src else ""


def summary_lines(s: dict) -> list[str]:
    p, kv = s["parameters"], s["kv_bytes_per_token"]
    seq = s["kv_bytes_per_sequence_at_2048"]
    ratio = seq["original"] / max(seq["converted"], 1)
    return [
        f"source        {s['source']} ({s['family']}, {s['parameters_original'] / 1e6:.1f}M parameters)",
        f"layout        block length {s['block_length']}, prefix {s['prefix_length']}, {s['layer_map']}: "
        + _embedder_layers(s) + f"block decoder <- layers {_layers(s['block_layers_from'])}, "
        f"token decoder <- layers {_layers(s['token_layers_from'])}",
        "parameters    " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in p.items()),
        f"KV cache      original {_mb(kv['original'])}/token; converted {_mb(kv['block_decoder'])}/token "
        f"+ {_mb(kv['token_decoder_window_per_sequence'])}/sequence (local window)",
        f"at 2048 tok   original {_mb(seq['original'])} vs converted {_mb(seq['converted'])} per sequence "
        f"({ratio:.1f}x smaller)",
    ]


def _tokenizer(s: dict) -> str:
    if s.get("tokenizer", "copied") == "copied":
        return "the original's, copied"
    return ("none: the source had no loadable tokenizer (its tokenizer files, if any, are copied as they were); "
            "put one here before eval, uptrain or generate")


def model_card(s: dict) -> str:
    p = s["parameters"]
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in p.items())
    return f"""---
library_name: transformers
tags: [block-transformer, blockformer]
---
# Block Transformer converted from `{s['source']}`

Made by [blockformer](https://github.com/) `convert` from **{s['source']}** ({s['family']} family), following
Ho et al., *Block Transformer: Global-to-Local Language Modeling for Fast Inference* (NeurIPS 2024, arXiv 2406.02657).
It has **not been uptrained**: run `blockformer uptrain` before expecting the original's quality.

```python
import blockformer  # registers the architecture with transformers' Auto classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER")
```

## Layout
- block length: {s['block_length']} tokens; prefix length: {s['prefix_length']}
- layer map: `{s['layer_map']}`; {_embedder_layers(s)}block decoder <- original layers {_layers(s['block_layers_from'])};
  token decoder <- original layers {_layers(s['token_layers_from'])}
- dtype: {s['dtype']}
- tokenizer: {_tokenizer(s)}
- initialisation: embedder table, token-decoder embeddings, final norm and LM head copied from the original;
  embedder projection = mean of the block's token vectors; expansion layer = stacked identities.

## Parameters
| part | parameters |
|---|---:|
{rows}

Original: {s['parameters_original']:,} parameters.

## KV cache
""" + "\n".join(f"- {line}" for line in summary_lines(s)[3:]) + "\n"
