"""`lm_eval --model blockformer --model_args pretrained=FOLDER --tasks ...` with an unpatched lm-eval 0.4.x.

The model is lm-eval's `TemplateLM` (its tokenisation and request handling) over blockformer's `Scorer`, so
lm-eval and `blockformer eval` score a Block Transformer through the same code. The registration runs when
lm-eval loads its model table (see `blockformer/_lm_eval_hook.py`), or on `import blockformer.eval.lm_eval_plugin`.

    lm_eval --model blockformer --model_args pretrained=out/smollm2-block --tasks piqa --limit 20
    lm_eval --model blockformer --model_args pretrained=out/smollm2-block,anchor=first ...   # the paper's alignment
"""
from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .. import sources
from .scoring import Scorer


@register_model("blockformer")
class BlockformerLM(TemplateLM):
    backend = "causal"

    def __init__(self, pretrained: str = "default", dtype: str = "float32", batch_tokens: int | None = None,
                 max_length: int | None = None, device: str = "cpu", anchor: str = "context", **_):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI asks for cuda by default
        src = sources.resolve(pretrained)
        model = sources.load_model(src, getattr(torch, dtype)).to(device)
        self.tokenizer = sources.load_tokenizer(src)
        self.scorer = Scorer(model, self.tokenizer, batch_tokens and int(batch_tokens),
                             max_length=max_length and int(max_length), anchor=anchor)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.scorer.encode(string, add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        return self.scorer.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy decoding until a stop string, through the same forward the scores use."""
        out = []
        for req in requests:
            context, kw = req.args
            out.append(self.scorer.greedy_until(context, kw.get("until") or [], int(kw.get("max_gen_toks", 256))))
        return out
