"""Tiny random models of every supported family, built from configs in-process (no network), and helpers."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 96
FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox", "gpt2"]


def tiny_config(family: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "llama":
        return LlamaConfig(**llama, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**llama, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**llama, tie_word_embeddings=False)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=256, rotary_pct=0.5, use_parallel_residual=True,
                             tie_word_embeddings=False, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **common)
    raise ValueError(family)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build_original(family: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # larger than HF's 0.02 init so that logits really depend on the input
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def load_original(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def convert_tiny(src, out, **kw):
    from blockformer.convert import ConvertConfig, convert
    convert(ConvertConfig(str(src), out, **kw))
    return load_block(out)


def load_block(path):
    import blockformer  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb_new_parts(model, scale=0.3):
    """Move the embedder projection and expansion away from their structured init (stronger tests)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in (model.embedder.proj, model.token_decoder.expand):
            m.weight.add_(torch.randn_like(m.weight) * scale / m.weight.shape[1] ** 0.5)
            m.bias.add_(torch.randn_like(m.bias) * 0.1)
    return model
