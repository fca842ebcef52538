"""Issue 12, helper A's families: q/k norms (Qwen3, OLMo2, Gemma 3), (1 + w) norms and embedding scale (Gemma),
sandwich / post norms (Gemma 2/3, OLMo2), soft-capping and query_pre_attn_scalar (Gemma 2), alternating sliding
windows with a local rope base (Gemma 2/3), and sliding windows in Mistral / Qwen2 / Qwen3.

Each family: the degenerate conversion reproduces the original's fp32 logits on 48 positions (6 windows), with
left padding too; a normal conversion is causal; greedy generation equals the full forward's argmax.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from blockformer.errors import BlockformerError
from blockformer.model import BlockTransformerConfig, BlockTransformerForCausalLM
from tiny import (NEW_FAMILIES_A, VOCAB, WINDOW, argmax_reference, assert_causal, build_original_a, convert_tiny,
                  load_original, perturb_new_parts, tiny_config_a, tiny_tokenizer)

T = 48  # > 5 windows of WINDOW tokens


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """name -> folder with the saved tiny original (every weight perturbed) and a tokenizer."""
    root, out = tmp_path_factory.mktemp("originals_a"), {}
    for name in NEW_FAMILIES_A:
        build_original_a(name).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


def ids(B=2, n=T, seed=0):
    return torch.randint(3, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("name", NEW_FAMILIES_A)
def test_degenerate_conversion_is_exact(originals, tmp_path, name):
    """block_length 1, every layer in the block decoder: the original's logits, left padding included."""
    original = load_original(originals[name])
    block = convert_tiny(originals[name], tmp_path / "b", block_length=1, block_layers=4)
    x = ids()
    assert_close(block(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)
    pad = 5  # row 1 left-padded: HF needs explicit positions, we count real tokens only
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    want = original(x, attention_mask=mask, position_ids=pos).logits
    got = block(x, attention_mask=mask).logits
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert_close(got[1, pad:], want[1, pad:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", NEW_FAMILIES_A)
def test_normal_conversion_is_causal(originals, tmp_path, name):
    model = perturb_new_parts(convert_tiny(originals[name], tmp_path / "b", block_length=4))
    x = ids(B=1)
    assert_causal(model, x, (0, 5, 17, 40))


@torch.no_grad()
@pytest.mark.parametrize("name", NEW_FAMILIES_A)
def test_generation_equals_forward(originals, tmp_path, name):
    """Prompt and continuation longer than the window: the cached path applies the same windows and ropes."""
    model = perturb_new_parts(convert_tiny(originals[name], tmp_path / "b", block_length=3, prefix_length=2))
    prompt = ids(B=1, n=14, seed=1)
    out = model.generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(out, argmax_reference(model, prompt, 16))


# --------------------------------------------------------------------------------- what each family maps to
def test_family_options_are_read_from_the_config(originals, tmp_path):
    def cfg(name, **kw):
        return convert_tiny(originals[name], tmp_path / name, **kw).config
    q3 = cfg("qwen3")
    assert q3.qk_norm == "head" and q3.block_windows is None and q3.token_windows is None  # no window: none
    o2 = cfg("olmo2")
    assert o2.qk_norm == "full" and o2.norm_placement == "post"
    g1 = cfg("gemma")
    assert g1.norm_offset == 1.0 and g1.embedding_scale == math.sqrt(32) and g1.norm_placement == "pre"
    g2 = cfg("gemma2", block_length=3)
    assert (g2.norm_placement, g2.attn_scale, g2.attn_softcap, g2.final_softcap) == ("sandwich", 24 ** -0.5, 5, 3)
    assert g2.block_windows == [WINDOW, None] and g2.token_windows == [WINDOW, None]  # in tokens
    g3 = cfg("gemma3_text")
    assert g3.qk_norm == "head" and g3.local_rope["rope_theta"] == 100.0 and g3.rope["rope_type"] == "linear"
    q2 = cfg("qwen2_window")
    assert q2.block_windows == [None, None] and q2.token_windows == [WINDOW] * 2
    assert cfg("mistral_window", layer_map="skip").block_windows == [WINDOW] * 2


@torch.no_grad()
@pytest.mark.parametrize("L,window,seen", [(1, 3, 3), (2, 5, 3), (4, 8, 2), (4, 9, 3)])
def test_block_decoder_window_is_ceil_of_window_over_block_length(L, window, seen):
    """Block j sees blocks j - ceil(window / L_B) + 1 .. j, and nothing before."""
    torch.manual_seed(0)
    cfg = BlockTransformerConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, block_length=L,
                                 num_block_layers=1, num_token_layers=0, rope={"rope_theta": 1e4},
                                 block_windows=[window], token_windows=[])
    bd = BlockTransformerForCausalLM(cfg).block_decoder.eval()
    x, valid = torch.randn(1, 10, 32), torch.ones(1, 10, dtype=torch.bool)
    ref = bd(x, valid)
    j = 9
    for back in range(1, 6):
        y = x.clone()
        y[:, j - back] += 1.0
        changed = not torch.allclose(bd(y, valid)[:, j], ref[:, j], atol=1e-6)
        assert changed == (back < seen), back


def test_bidirectional_gemma3_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = tiny_config_a("gemma3_text")
    cfg.use_bidirectional_attention = True
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    with pytest.raises(BlockformerError, match="use_bidirectional_attention") as e:
        convert_tiny(tmp_path / "src", tmp_path / "b")
    assert "\n" not in str(e.value)


@torch.no_grad()
def test_final_softcap_applies_to_forward_and_generation(originals, tmp_path, monkeypatch):
    """Gemma 2 caps logits at 3 (tiny config): the full forward and the logits generation samples from."""
    import blockformer.generate as gen
    model = convert_tiny(originals["gemma2"], tmp_path / "b", block_length=3)
    x = ids(B=1, n=20)
    assert model.lm_head(model.final_hidden(x)).abs().max() > 3.5  # uncapped logits go past the cap
    assert model(x).logits.abs().max() <= 3.0
    seen, pick = [], gen.next_token
    monkeypatch.setattr(gen, "next_token", lambda logits, s, g: seen.append(logits) or pick(logits, s, g))
    model.generate(x[:, :5], max_new_tokens=6, do_sample=True, seed=0, eos_token_id=None)
    assert len(seen) == 6 and all(lg.abs().max() <= 3.0 for lg in seen)
