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


def write_synthetic_tasks(root, n=12, seed=0):
    """Small files in the original formats of piqa, arc_easy, lambada_openai, wikitext and hellaswag (derived)."""
    import json
    import random
    from pathlib import Path
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(4, VOCAB - 4)}" for _ in range(k))  # noqa: E731
    root = Path(root)
    for sub in ("piqa", "arc_easy", "lambada_openai", "wikitext2", "hellaswag"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with open(root / "piqa/valid.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"goal": words(rng.randint(2, 6)), "sol1": words(rng.randint(1, 8)),
                                "sol2": words(rng.randint(1, 8))}) + "\n")
    (root / "piqa/valid-labels.lst").write_text("".join(f"{rng.randint(0, 1)}\n" for _ in range(n)))
    with open(root / "arc_easy/ARC-Easy-Test.jsonl", "w") as f:
        for i in range(n):
            labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3"]
            f.write(json.dumps({"id": f"q{i}", "answerKey": rng.choice(labels), "question": {
                "stem": words(rng.randint(3, 9)),
                "choices": [{"text": words(rng.randint(1, 3)), "label": lab} for lab in labels]}}) + "\n")
    with open(root / "lambada_openai/lambada_test.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": words(rng.randint(5, 20))}) + "\n")
    pages = []
    for p in range(3):
        body = "\n".join(f" {words(rng.randint(3, 30))} , {words(3)} . " for _ in range(rng.randint(2, 5)))
        pages.append(f" = {words(2)} = \n \n{body}\n \n = = {words(1)} = = \n \n {words(12)} \n")
    (root / "wikitext2/wiki.test.raw").write_text("".join(pages))
    lines = []
    for _ in range(n):
        lines += [words(rng.randint(3, 9)), str(rng.randint(0, 3))] + [words(rng.randint(1, 5)) for _ in range(4)]
    (root / "hellaswag/hellaswag_val_full.txt").write_text("\n".join(lines) + "\n")
    return root


def save_with_other_tokenizer(src, dst):
    """The original model of `src` saved with a tokenizer that has one more token."""
    load_original(src).save_pretrained(dst)
    tok = tiny_tokenizer()
    tok.add_tokens(["zzz"])
    tok.save_pretrained(dst)
    return dst
