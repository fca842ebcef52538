"""`convert --init contextual`: each new part checked against a hand computation from the original's hidden states."""
from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.convert import ConvertConfig, convert
from blockformer.convert.contextual import calibration_rows
from blockformer.errors import BlockformerError
from tiny import FAMILIES, VOCAB, load_block, load_original, split_states, tiny_tokenizer


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    rng = random.Random(1)  # words 4..59 only, so the upper part of the vocabulary is never seen
    text = "\n".join(" ".join(f"w{rng.randrange(0, 56)}" for _ in range(12)) for _ in range(200))
    path = tmp_path_factory.mktemp("calib") / "notes.txt"
    path.write_text(text)
    return path


def contextual(src, out, notes, **kw):
    cfg = ConvertConfig(str(src), out, block_length=4, init="contextual", calib_data=str(notes), calib_tokens=512,
                        **kw)
    return convert(cfg)


def test_every_new_part_matches_a_hand_computation(tiny_dirs, notes, tmp_path):
    src = tiny_dirs["llama"]
    s = contextual(src, tmp_path / "ctx", notes)
    orig, blk = load_original(src), load_block(tmp_path / "ctx")
    split = blk.config.num_block_layers
    rows, h, seen, mean = split_states(orig, blk, notes)
    ids = rows.flatten()
    E = orig.get_input_embeddings().weight.double()
    table = blk.token_decoder.embed.weight.double()
    torch.testing.assert_close(table[seen], mean, rtol=1e-4, atol=1e-4)
    w = torch.bincount(ids, minlength=VOCAB)[seen].clamp(max=50).double().sqrt()[:, None]
    X, Y = E[seen] * w, mean * w  # unseen tokens: ridge regression from embedding to mean state, fitted on seen ones
    W = torch.linalg.solve(X.T @ X + 1e-3 * (X * X).sum(0).mean() * torch.eye(E.shape[1], dtype=E.dtype), X.T @ Y)
    torch.testing.assert_close(table[~seen], E[~seen] @ W, rtol=1e-3, atol=1e-3)
    # the head keeps the original output embeddings, untied from the new input table
    assert not blk.config.tie_word_embeddings
    torch.testing.assert_close(blk.lm_head.weight, orig.get_output_embeddings().weight)
    D = E.shape[1]  # prefix slot 0: the mean state at position 0, whatever the context; slot 1: the context
    torch.testing.assert_close(blk.token_decoder.expand.bias[:D].double(), h[:, 0].double().mean(0), rtol=1e-4,
                               atol=1e-4)
    assert blk.token_decoder.expand.weight[:D].abs().max() == 0
    torch.testing.assert_close(blk.token_decoder.expand.weight[D:], torch.eye(D))
    x = torch.randn(2, 3, 4 * D)  # the embedder passes the block's last token through
    torch.testing.assert_close(blk.embedder.proj(x), x[..., 3 * D:])
    assert s["init"] == "contextual" and s["calib_tokens"] == rows.numel()
    assert blk.config.provenance["init"]["split_layer"] == split


# transformers rebuilds the tiny word-level tokenizer saved beside a qwen2 config as a byte-level Qwen2Tokenizer
# that encodes this text to nothing; the conversion itself is family-generic (layers are found by the adapter table)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2"])
def test_contextual_models_stay_causal(tiny_dirs, notes, tmp_path, family):
    """Every family: the table holds the mean state entering the split layer (found through the adapter table), the
    prefix's slot 0 the mean state at position 0, and the model stays causal."""
    contextual(tiny_dirs[family], tmp_path / "ctx", notes)
    blk = load_block(tmp_path / "ctx")
    _, h, seen, mean = split_states(load_original(tiny_dirs[family]), blk, notes)
    scale = blk.config.embedding_scale or 1.0  # the token decoder's lookup multiplies by it
    torch.testing.assert_close(blk.token_decoder.embed.weight[seen].double() * scale, mean, rtol=1e-4, atol=1e-4)
    D = h.shape[-1]
    torch.testing.assert_close(blk.token_decoder.expand.bias[:D].double(), h[:, 0].double().mean(0), rtol=1e-4,
                               atol=1e-4)
    x = torch.randint(4, VOCAB, (1, 23))
    y = x.clone()
    y[0, 13:] = torch.randint(4, VOCAB, (10,))
    with torch.no_grad():
        a, b = blk(x).logits, blk(y).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :13], b[:, :13])
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_contextual_beats_the_papers_init_on_calibration_text(tiny_dirs, notes, tmp_path):
    """On text like the calibration text, the contextual start is closer to the original than the paper's."""
    src = tiny_dirs["llama"]
    contextual(src, tmp_path / "ctx", notes)
    convert(ConvertConfig(str(src), tmp_path / "paper", block_length=4))
    orig = load_original(src)
    x = calibration_rows(tiny_tokenizer(), str(notes), 2048, 64, seed=7)

    def kl(path):
        with torch.no_grad():
            p, q = orig(x).logits.log_softmax(-1), load_block(path)(x).logits.log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())
    assert kl(tmp_path / "ctx") < kl(tmp_path / "paper")


def test_embedder_mix_adds_the_blocks_other_tokens_at_its_weight(tiny_dirs, notes, tmp_path):
    s = contextual(tiny_dirs["llama"], tmp_path / "mix", notes, embedder_mix=0.3)
    blk = load_block(tmp_path / "mix")
    D = blk.config.hidden_size
    x = torch.randn(2, 3, 4 * D)  # (B, n_blocks, L_B * D): the block's 4 token vectors, concatenated
    want = 0.3 * (x[..., :D] + x[..., D:2 * D] + x[..., 2 * D:3 * D]) + x[..., 3 * D:]
    torch.testing.assert_close(blk.embedder.proj(x), want)
    assert s["embedder_mix"] == 0.3 and blk.config.provenance["init"]["embedder_mix"] == 0.3
    # like --calib-tokens, it belongs to the contextual init: a recipe that switches to the paper's init keeps the
    # recipe's mix and gets the paper's mean embedder
    convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "paper", block_length=4, embedder_mix=0.3))
    torch.testing.assert_close(load_block(tmp_path / "paper").embedder.proj(x), x.unflatten(-1, (4, D)).mean(-2))


@pytest.mark.parametrize("kw, msg", [({"init": "magic"}, "--init must be one of"),
                                     ({"calib_tokens": 0}, "--calib-tokens must be at least 1"),
                                     ({"init": "contextual", "embedder_mix": 1.5}, "--embedder-mix must be between")])
def test_bad_init_options_are_one_line(tiny_dirs, tmp_path, kw, msg):
    with pytest.raises(BlockformerError, match=msg):
        convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "x", **kw))
    r = CliRunner().invoke(main, ["convert", str(tiny_dirs["llama"]), str(tmp_path / "y"), "--init", "contextual",
                                  "--calib-data", str(tmp_path / "missing.txt")])
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "missing.txt" in errors[0] and "Traceback" not in r.output
    assert "Loading weights" not in r.output  # refused before the model is loaded


def test_contextual_lookups_are_the_mean_states_for_a_family_that_scales_embeddings(notes, tmp_path):
    """Gemma multiplies token lookups by sqrt(D): the stored table is the states divided by it."""
    from tiny import build_original_a
    src = tmp_path / "gemma"
    build_original_a("gemma").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    contextual(src, tmp_path / "ctx", notes)
    orig, blk = load_original(src), load_block(tmp_path / "ctx")
    assert blk.config.embedding_scale and blk.config.embedding_scale != 1
    rows, _, seen, mean = split_states(orig, blk, notes)
    v = int(rows.flatten()[5])
    with torch.no_grad():
        looked_up = blk.token_decoder.embed_tokens(torch.tensor([[v]]), blk.config.prefix_length)[0, 0]
    torch.testing.assert_close(looked_up.double(), mean[int(seen[:v].sum())], rtol=1e-4, atol=1e-4)
