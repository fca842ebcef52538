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
    if family.split(":")[0] in NEW_FAMILIES_B:
        return tiny_config_b(family)
    if family in NEW_FAMILIES_A:
        return tiny_config_a(family)
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


def split_states(orig, blk, notes, n_tokens: int = 512, seq_len: int = 256):
    """What `--init contextual` must compute from `notes`: its calibration rows, the original's states entering the
    split layer (R, T, D), which tokens were seen, and per seen token the mean of its states (fp64)."""
    from blockformer.convert.contextual import calibration_rows
    rows = calibration_rows(tiny_tokenizer(), str(notes), n_tokens, seq_len)
    with torch.no_grad():
        h = torch.cat([orig(input_ids=r[None], output_hidden_states=True).hidden_states[blk.config.num_block_layers]
                       for r in rows])
    ids, flat = rows.flatten(), h.flatten(0, 1).double()
    seen = torch.bincount(ids, minlength=VOCAB) > 0
    return rows, h, seen, torch.stack([flat[ids == v].mean(0) for v in range(VOCAB) if seen[v]])


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
        if model.token_decoder.bridge is not None:  # local token inputs: 0 at init would test nothing
            w = model.token_decoder.bridge.weight
            w.add_(torch.randn_like(w) * scale / w.shape[1] ** 0.5)
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


# ------------------------------------------------------------------ issue 12, helper B: fused/parallel/positional
NEW_FAMILIES_B = ["phi3", "phi", "stablelm", "opt", "falcon", "gptj", "gpt_neo"]
# each family's layouts worth telling apart ("family:variant"); windows of 8 so that 48 positions slide
VARIANTS_B = ["phi3", "phi", "phi:qk_layernorm", "stablelm", "stablelm:parallel", "opt", "falcon",
              "falcon:new_arch", "falcon:sequential", "gptj", "gpt_neo"]


def tiny_config_b(name: str):
    """Tiny configs of helper B's families; `name` is a family or "family:variant" (see VARIANTS_B)."""
    from transformers import (FalconConfig, GPTJConfig, GPTNeoConfig, OPTConfig, PhiConfig, Phi3Config,
                              StableLmConfig)
    family, _, variant = name.partition(":")
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dims = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256, **common)
    if family == "phi3":
        return Phi3Config(**dims, intermediate_size=64, num_key_value_heads=2, sliding_window=8,
                          tie_word_embeddings=False)
    if family == "phi":
        return PhiConfig(**dims, intermediate_size=64, num_key_value_heads=2, partial_rotary_factor=0.5,
                         qk_layernorm=variant == "qk_layernorm", tie_word_embeddings=False)
    if family == "stablelm":
        par = variant == "parallel"
        return StableLmConfig(**dims, intermediate_size=64, num_key_value_heads=2, partial_rotary_factor=0.25,
                              use_qkv_bias=par, qk_layernorm=par, use_parallel_residual=par,
                              tie_word_embeddings=False)
    if family == "opt":
        return OPTConfig(**dims, ffn_dim=64, word_embed_proj_dim=32, tie_word_embeddings=True)
    if family == "falcon":  # default: Falcon-7B's multi-query parallel layout
        arch = {"new_arch": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False),
                "sequential": dict(multi_query=False, parallel_attn=False, bias=True)}.get(variant, {})
        return FalconConfig(**dims, ffn_hidden_size=64, tie_word_embeddings=False, **arch)
    if family == "gptj":
        return GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256, n_inner=64,
                          tie_word_embeddings=False, **common)
    if family == "gpt_neo":
        return GPTNeoConfig(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, window_size=8,
                            attention_types=[[["global", "local"], 2]], max_position_embeddings=256, **common)
    raise ValueError(name)


def build_original_b(name: str, seed: int = 0):
    """A tiny original of `name` with EVERY weight moved away from its init (norm gains and biases too)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config_b(name), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() >= 2 else 0.2))
    return model.eval()


# ------------------------------------------------------------------ issue 12, helper A: norms, attention, windows
NEW_FAMILIES_A = ["qwen3", "olmo2", "gemma", "gemma2", "gemma3_text", "mistral_window", "qwen2_window",
                  "qwen3_window"]
WINDOW = 8  # tiny sliding window: tests run 40+ positions, so it really masks


def tiny_config_a(name: str):
    """Tiny configs of helper A's families; `*_window` are the older families with a sliding window that bites."""
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, MistralConfig, Olmo2Config,
                              Qwen2Config, Qwen3Config)
    base = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32,
                intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)
    gemma = dict(base, head_dim=16, tie_word_embeddings=True)  # head_dim != hidden / heads, as in real Gemmas
    window = dict(sliding_window=WINDOW, tie_word_embeddings=False)
    configs = {
        "qwen3": lambda: Qwen3Config(**base, head_dim=16, attention_bias=True, tie_word_embeddings=False),
        "olmo2": lambda: Olmo2Config(**base, attention_bias=True, tie_word_embeddings=False),
        "gemma": lambda: GemmaConfig(**gemma),
        # softcaps small enough to bite on the perturbed weights; query_pre_attn_scalar != head_dim
        "gemma2": lambda: Gemma2Config(**gemma, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        # alternating local/global layers; global rope linearly scaled, local rope with its own base
        "gemma3_text": lambda: Gemma3TextConfig(
            **gemma, query_pre_attn_scalar=24, sliding_window=WINDOW, sliding_window_pattern=2,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        "mistral_window": lambda: MistralConfig(**base, **window),
        "qwen2_window": lambda: Qwen2Config(**base, **window, use_sliding_window=True, max_window_layers=2),
        "qwen3_window": lambda: Qwen3Config(**base, **window, use_sliding_window=True, max_window_layers=1),
    }
    return configs[name]()


def build_original_a(name: str):
    """`build_original`, with every weight moved away from its init: norm weights too (Gemma stores w - 1)."""
    model = build_original(name)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "bias" not in pname:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def argmax_reference(model, prompt, n):
    """Repeated full forward passes over the growing sequence, prompt anchored as generation anchors it."""
    seq = prompt.clone()
    for _ in range(n):
        logits = model(seq, anchor=torch.tensor([prompt.shape[1] - 1])).logits[0, -1]
        seq = torch.cat([seq, logits.argmax()[None, None]], 1)
    return seq


def assert_causal(model, x, cuts, atol=1e-6):
    """Changing the tokens after position t never changes the logits at positions <= t, but does change later ones."""
    from torch.testing import assert_close
    ref = model(x).logits
    for t in cuts:
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 7) % (VOCAB - 3) + 3
        out = model(y).logits
        assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=0, atol=atol)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:], atol=1e-4)
