"""Issue 12, fused/parallel/positional families (phi3, phi, stablelm, opt, falcon, gptj, gpt_neo) and the
conversion plumbing: every source tensor is used, refusals in one line.

Exactness evidence per family variant: the degenerate conversion (block_length 1, every layer in the block decoder)
reproduces the original's fp32 logits on 48 positions (longer than the windows of 8); a normal conversion is causal,
ignores left padding and generates what its full forward predicts.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from blockformer import families
from blockformer.convert import ConvertConfig, convert
from blockformer.errors import BlockformerError
from tiny import (VARIANTS_B, VOCAB, assert_causal, build_original_b, convert_tiny, perturb_new_parts, tiny_config_b,
                  tiny_tokenizer)


def save_original(name: str, path, **overrides):
    """A tiny original of `name` (config fields overridden), every weight perturbed, saved with a tokenizer."""
    from transformers import AutoModelForCausalLM
    if overrides:
        base = tiny_config_b(name)
        cfg = type(base).from_dict({**base.to_dict(), **overrides})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = build_original_b(name)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals_b")
    return {name: save_original(name, root / name.replace(":", "-")) for name in VARIANTS_B}


def tokens(B=2, T=48, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS_B)
def test_degenerate_conversion_is_exact(originals, name, tmp_path):
    from tiny import load_original
    block = convert_tiny(originals[name], tmp_path / "b", block_length=1, block_layers=4)
    assert block.config.num_token_layers == 0
    x = tokens()
    # atol 5e-5: the originals' own fp32 logits differ from fp64 by up to 3e-5 (GPT-Neo's unscaled attention)
    assert_close(block(x).logits, load_original(originals[name])(x).logits, rtol=1e-5, atol=5e-5)


@torch.no_grad()
@pytest.mark.parametrize("name,no_window,windows", [
    ("phi3", {"sliding_window": None}, [8, 8, 8, 8]),
    ("gpt_neo", {"attention_types": [[["global"], 4]], "attention_layers": ["global"] * 4}, [None, 8, None, 8])])
def test_windows_map_per_layer_and_really_bite(originals, name, no_window, windows, tmp_path):
    from tiny import load_original
    from transformers import AutoModelForCausalLM
    block = convert_tiny(originals[name], tmp_path / "b", block_length=1, block_layers=4)
    assert block.config.block_windows == windows
    normal = convert_tiny(originals[name], tmp_path / "n", block_length=4)
    assert (normal.config.block_windows, normal.config.token_windows) == (windows[:2], windows[2:])
    x = tokens()
    ref = load_original(originals[name])(x).logits
    wide = AutoModelForCausalLM.from_pretrained(originals[name], dtype=torch.float32, **no_window).eval()
    assert not torch.allclose(ref, wide(x).logits, atol=1e-3)  # so the exactness test above saw the windows


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS_B)
def test_normal_conversion_is_causal(originals, name, tmp_path):
    model = perturb_new_parts(convert_tiny(originals[name], tmp_path / "b", block_length=4))
    assert model.config.num_block_layers == 2
    x = tokens(B=1, T=40)
    assert_causal(model, x, (0, 5, 17, 30), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS_B)
def test_left_padding_does_not_change_real_logits(originals, name, tmp_path):
    model = perturb_new_parts(convert_tiny(originals[name], tmp_path / "b", block_length=4))
    x = tokens(B=1, T=21)
    ref = model(x).logits[0]
    pad = 3
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 21)], 1).long()
    assert_close(model(ids, attention_mask=mask).logits[0, pad:], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", VARIANTS_B)
def test_generation_equals_full_forward(originals, name, tmp_path):
    model = perturb_new_parts(convert_tiny(originals[name], tmp_path / "b", block_length=4))
    prompt = tokens(B=1, T=7, seed=1)
    out = model.generate(prompt, max_new_tokens=30, eos_token_id=None)  # 37 positions: past the windows of 8
    seq = prompt.clone()
    for _ in range(30):
        logits = model(seq, anchor=torch.tensor([prompt.shape[1] - 1])).logits[0, -1]
        seq = torch.cat([seq, logits.argmax()[None, None]], 1)
    assert torch.equal(out, seq)


# ------------------------------------------------------------------ every source tensor is used
def without_rules(monkeypatch, family: str, ours: set, **arch_overrides):
    """The adapter of `family` with the rules for our tensors `ours` removed (and its arch overridden)."""
    import dataclasses
    fam = families.FAMILIES[family]
    arch = (lambda cfg: {**fam.arch(cfg), **arch_overrides}) if arch_overrides else fam.arch
    layer = {k: v for k, v in fam.layer.items() if k not in ours}
    monkeypatch.setitem(families.FAMILIES, family, dataclasses.replace(fam, arch=arch, layer=layer))


@pytest.mark.parametrize("arch", [{}, {"qkv_bias": False}])  # the bias forgotten by the rules, or by arch too
def test_a_source_tensor_no_rule_consumes_stops_the_conversion(tiny_dirs, tmp_path, monkeypatch, arch):
    from click.testing import CliRunner
    from blockformer.cli import main
    without_rules(monkeypatch, "qwen2", {"attn.k.bias"}, **arch)
    with pytest.raises(BlockformerError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.bias") as e:
        convert(ConvertConfig(str(tiny_dirs["qwen2"]), tmp_path / "b"))
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, ["convert", str(tiny_dirs["qwen2"]), str(tmp_path / "b")])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and errors == [f"error: {e.value}"] and "Traceback" not in r.output


def test_layers_the_skip_map_leaves_out_are_not_unused(tiny_dirs, tmp_path, monkeypatch):
    """The skip map leaves layers 1 and 3 out on purpose: no 'unused tensor' stop for them, the kept layers 0 and 2
    are copied into both decoders, and the check still stops a kept layer's tensor that no rule consumes."""
    from safetensors.torch import load_file
    convert(ConvertConfig(str(tiny_dirs["qwen2"]), tmp_path / "b", layer_map="skip"))
    ours, theirs = load_file(tmp_path / "b" / "model.safetensors"), load_file(tiny_dirs["qwen2"] / "model.safetensors")
    for part in ("block_decoder", "token_decoder"):  # each decoder gets layers 0 and 2
        for j, i in enumerate((0, 2)):
            assert torch.equal(ours[f"{part}.layers.{j}.mlp.up.weight"], theirs[f"model.layers.{i}.mlp.up_proj.weight"])
    without_rules(monkeypatch, "qwen2", {"attn.k.bias"})
    with pytest.raises(BlockformerError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.bias"):
        convert(ConvertConfig(str(tiny_dirs["qwen2"]), tmp_path / "c", layer_map="skip"))


def test_a_forgotten_final_norm_bias_or_head_bias_is_named(originals, tmp_path, monkeypatch):
    import dataclasses
    fam = families.FAMILIES["phi"]
    monkeypatch.setitem(families.FAMILIES, "phi", dataclasses.replace(fam, arch=lambda c: {**fam.arch(c),
                                                                                             "lm_head_bias": False}))
    with pytest.raises(BlockformerError, match=r"tensor lm_head\.bias"):
        convert(ConvertConfig(str(originals["phi"]), tmp_path / "b"))


# ------------------------------------------------------------------ variants refused in one line
@pytest.mark.parametrize("name,overrides,words", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4, "partial_rotary_factor": 1.0}}, "longrope"),
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
    ("opt", {"word_embed_proj_dim": 16}, "word_embed_proj_dim=16"),
    ("falcon", {"alibi": True}, "alibi"),
])
def test_unsupported_variants_are_refused_in_one_line(tmp_path, name, overrides, words):
    from click.testing import CliRunner
    from blockformer.cli import main
    src = save_original(name, tmp_path / "src", **overrides)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "b")])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and words in errors[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ GGUF input
def write_gguf(model, path, arch: str, tensors: bool = True):
    """`model` as llama.cpp's converter writes it: its metadata keys and tensor names, F32 tensors, q/k rows of
    Llama permuted as llama.cpp permutes them (transformers' GGUF reader undoes that)."""
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or cfg.ffn_hidden_size)  # Falcon: ffn_hidden_size
    w.add_head_count(cfg.num_attention_heads)
    kv = getattr(cfg, "num_key_value_heads", None) or (1 if getattr(cfg, "multi_query", False) else cfg.num_kv_heads)
    w.add_head_count_kv(kv)  # Falcon names it num_kv_heads, and multi-query means one
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(getattr(cfg, "rms_norm_eps", 1e-5))
    w.add_layer_norm_eps(getattr(cfg, "layer_norm_eps", 1e-5))
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if arch.startswith("gemma"):  # Gemma's head_dim is not hidden / heads; llama.cpp writes it and the window
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    for key, t in model.state_dict().items() if tensors else ():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes a tied head once, as the embeddings
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            t = t + 1  # llama.cpp stores Gemma's (1 + w) norm scales; transformers' reader subtracts the 1
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, -1).transpose(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t.float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def gguf_original(family: str):
    """A tiny original of `family` that transformers' GGUF reader can read back. Its qwen3 reader takes head_dim
    from the config default (128, as in every real Qwen3), not from the file: the tiny model uses 128 too."""
    from tiny import build_original, build_original_a
    if family == "qwen3":
        from transformers import AutoModelForCausalLM, Qwen3Config
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.1))
        return model.eval()
    if family == "falcon":  # Falcon-7B's layout; its reader assumes the FFN is 4 x hidden, as in real Falcons
        from transformers import AutoModelForCausalLM, FalconConfig
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(FalconConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, multi_query=True,
            parallel_attn=True, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
            dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.1))
        return model.eval()
    if family.startswith("gemma"):
        return build_original_a({"gemma3": "gemma3_text"}.get(family, family))
    return build_original(family) if family == "llama" else build_original_b(family)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "stablelm", "gemma2", "gemma3", "falcon"])
def test_gguf_input_converts_exactly(family, tmp_path):
    """The degenerate conversion of a GGUF file equals the model transformers loads from the same file."""
    from transformers import AutoModelForCausalLM
    original = gguf_original(family)
    path = write_gguf(original, tmp_path / "m.gguf", family)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    block = convert_tiny(path, tmp_path / "b", block_length=1, block_layers=4)
    assert block.config.provenance["source_kind"] == "gguf" and block.config.provenance["family"] == hf.config.model_type
    if family.startswith("gemma"):  # the windows came through the file, and the tokens outrun them
        assert hf.config.sliding_window == original.config.sliding_window < tokens().shape[1]
    x = tokens()
    assert_close(block(x).logits, hf(x).logits, rtol=1e-5, atol=5e-5)
    if family in ("llama", "qwen3", "falcon"):  # the file really holds the original (llama's q/k permutation undone on reading)
        assert_close(hf(x).logits, original(x).logits, rtol=1e-5, atol=5e-5)


def test_gguf_of_a_family_the_gguf_reader_cannot_read_is_one_line(tmp_path):
    from click.testing import CliRunner
    from blockformer.cli import main
    from tiny import build_original
    write_gguf(build_original("llama"), tmp_path / "m.gguf", "gptj", tensors=False)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "m.gguf"), str(tmp_path / "b")])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "gptj" in errors[0] and "GGUF" in errors[0] and "phi3" in errors[0], errors[0]  # says what it can read
    assert not (tmp_path / "b").exists()


@torch.no_grad()
@pytest.mark.parametrize("name", ["phi3", "phi:qk_layernorm", "stablelm:parallel", "opt", "falcon:new_arch", "gptj",
                                  "gpt_neo"])
def test_contextual_init_runs_and_stays_causal(originals, name, tmp_path):
    """--init contextual finds each family's layers through the adapter table and hooks the split layer."""
    notes = tmp_path / "notes.txt"
    notes.write_text("\n".join(" ".join(f"w{(7 * i + j) % 56}" for j in range(12)) for i in range(100)))
    convert(ConvertConfig(str(originals[name]), tmp_path / "b", init="contextual", calib_data=str(notes),
                          calib_tokens=512))
    from tiny import load_block, load_original, split_states
    model = load_block(tmp_path / "b")
    _, _, seen, mean = split_states(load_original(originals[name]), model, notes)  # the split layer's mean states
    scale = model.config.embedding_scale or 1.0
    assert_close(model.token_decoder.embed.weight[seen].double() * scale, mean, rtol=1e-4, atol=1e-4)
    x = tokens(B=1, T=23)
    y = x.clone()
    y[0, 13:] = (y[0, 13:] + 5) % (VOCAB - 3) + 3
    a, b = model(x).logits, model(y).logits
    assert torch.isfinite(a).all() and not torch.allclose(a[:, 13:], b[:, 13:])
    assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma2", "olmo2", "phi", "falcon:new_arch", "gpt_neo", "opt"])
def test_distillation_and_alignment_run_for_the_new_families(name, corpus, tmp_path):
    """Uptraining reads the teacher through the same head (soft-cap included) and taps the split layer generically:
    one KD + alignment step is finite and changes the weights, for families with soft-caps, post norms, parallel
    layers and learned positions."""
    from blockformer.uptrain import UptrainConfig, uptrain
    from tiny import build_original_a, load_block, tiny_tokenizer
    src = tmp_path / "src"
    (build_original_a(name) if ":" not in name and name in ("gemma2", "olmo2") else build_original_b(name)).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    block = convert_tiny(src, tmp_path / "b")
    kw = dict(seq_len=32, batch_size=2, save_every=2, eval_every=2, warmup_steps=1)
    s = uptrain(UptrainConfig(str(tmp_path / "b"), str(corpus), tmp_path / "run", teacher=str(src), max_steps=2,
                              align_weight=0.01, **kw))
    assert s["step"] == 2 and len(s["history"]) == 2
    # the same first batch without the alignment term, then without the teacher: each term is in the loss
    first = [uptrain(UptrainConfig(str(tmp_path / "b"), str(corpus), tmp_path / f"r{i}", max_steps=1, **kw, **extra))
             ["history"][0]["loss"] for i, extra in enumerate([dict(teacher=str(src)), {}])]
    assert s["history"][0]["loss"] > first[0] + 1e-6 and abs(first[0] - first[1]) > 1e-4
    assert all(math.isfinite(h["loss"]) for h in s["history"]) and math.isfinite(s["history"][-1]["val_loss"])
    after = load_block(tmp_path / "run" / "model")
    x = tokens()
    assert not torch.equal(after(x).logits, block(x).logits)
