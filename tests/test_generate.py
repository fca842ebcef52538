"""Generation: greedy equals the argmax of full forward passes; batching, sampling, EOS, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from blockformer.errors import BlockformerError
from tiny import VOCAB, argmax_reference, convert_tiny, perturb_new_parts, tiny_tokenizer


@pytest.fixture
def model(tiny_dirs, family, tmp_path):
    return perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=3, prefix_length=2))


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 5, 6])
def test_greedy_equals_forward_argmax(model, prompt_len):
    prompt = torch.randint(3, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = model.generate(prompt, max_new_tokens=11, eos_token_id=None)
    assert torch.equal(out, argmax_reference(model, prompt, 11))


@torch.no_grad()
@pytest.mark.parametrize("block_length", [1, 4])
def test_greedy_equals_forward_argmax_block_lengths(tiny_dirs, tmp_path, block_length):
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=block_length))
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, max_new_tokens=9, eos_token_id=None), argmax_reference(model, prompt, 9))


@torch.no_grad()
def test_batch_equals_one_by_one(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (2, 7, 4)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as tokenizers do for generation
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, eos_token_id=None)
        assert torch.equal(batch[b, T:], alone[0, len(p):])


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed(model):
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, eos_token_id=None)
    a, b = model.generate(prompt, seed=7, **kw), model.generate(prompt, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(prompt, seed=8, **kw))


@pytest.mark.parametrize("kw, support, probs", [
    (dict(top_k=3), [0, 1, 2], [0.4, 0.25, 0.15]),
    (dict(top_p=0.6), [0, 1], [0.4, 0.25]),            # the token that crosses p (cumulative 0.65) is kept
    (dict(temperature=2.0), list(range(8)), [x ** 0.5 for x in (0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01)]),
    (dict(temperature=1e-6), [0], [1.0]),
])
def test_sampling_draws_from_the_truncated_tempered_distribution(kw, support, probs):
    """4,000 seeded draws from one row of known probabilities: only the allowed tokens, at the renormalised
    frequencies (binomial standard error under 0.008, tolerance 0.03)."""
    from blockformer.generate import Sampling, next_token
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01])
    draws = next_token(p.log().expand(4000, -1), Sampling(do_sample=True, **kw), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).float() / len(draws)
    want = torch.zeros(8)
    want[support] = torch.tensor(probs) / sum(probs)
    assert set(draws.unique().tolist()) <= set(support)
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)
    assert torch.equal(next_token(p.log()[None], Sampling(), None), torch.tensor([0]))  # greedy: the argmax


@torch.no_grad()
def test_eos_stops_each_sequence(model):
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    free = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 5 + 3])  # a token row 0 emits: it must stop there
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    for b in range(2):
        hits = (free[b, 5:] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 10  # tokens kept, the EOS included
        assert torch.equal(out[b, :5 + stop], free[b, :5 + stop]) and (out[b, 5 + stop:] == 0).all()
    assert (out[0, 5:] == 0).any()


@torch.no_grad()
def test_hf_streamer_gets_the_prompt_then_every_token(model):
    """HF's convention: the first put() is the prompt, so skip_prompt=True streams exactly the new tokens."""
    from transformers import TextIteratorStreamer
    tok, prompt = tiny_tokenizer(), torch.tensor([[5, 6, 7]])
    s = TextIteratorStreamer(tok, skip_prompt=True, timeout=0)
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=None, streamer=s)
    assert "".join(s) == tok.decode(out[0, 3:])


@torch.no_grad()
def test_text_streamer_prints_prompt_and_generation(model, capsys):
    from transformers import TextStreamer
    tok, prompt = tiny_tokenizer(), torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=7, eos_token_id=None, streamer=TextStreamer(tok))
    assert capsys.readouterr().out == tok.decode(out[0]) + "\n"


@pytest.mark.parametrize("kw,msg", [(dict(max_new_tokens=0), "max_new_tokens"),
                                    (dict(max_new_tokens=300), "context")])
def test_bad_generation_arguments(model, kw, msg):
    with pytest.raises(BlockformerError, match=msg):
        model.generate(torch.tensor([[5, 6]]), **kw)


def test_empty_prompt(model):
    with pytest.raises(BlockformerError, match="empty prompt"):
        model.generate(torch.tensor([[0, 0]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=3)


# ------------------------------------------------------------------------------- sliding windows (issue 12)
@pytest.fixture
def windowed(tmp_path):
    """Mistral with a 3-token window in every layer, L_B = 4: the block decoder sees ceil(3 / 4) = 1 block (its
    own) and the token decoder's 5 local positions (prefix 2 + 3 tokens) slide too."""
    from test_convert import save_tiny
    src = save_tiny("mistral", tmp_path / "src", sliding_window=3)
    model = perturb_new_parts(convert_tiny(src, tmp_path / "b", block_length=4, prefix_length=2))
    assert model.config.block_windows == [3, 3] and model.config.token_windows == [3, 3]
    return model


@torch.no_grad()
def test_windows_bite_in_both_decoders(windowed):
    from blockformer.model import BlockTransformerForCausalLM
    x = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    for part in ("block_windows", "token_windows"):
        cfg = windowed.config.to_dict()
        cfg[part] = None
        unwindowed = BlockTransformerForCausalLM(type(windowed.config).from_dict(cfg)).eval()
        unwindowed.load_state_dict(windowed.state_dict())
        assert not torch.allclose(unwindowed(x).logits, windowed(x).logits, atol=1e-4), part


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 6, 13])
def test_windowed_greedy_equals_forward_argmax(windowed, prompt_len):
    prompt = torch.randint(3, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = windowed.generate(prompt, max_new_tokens=18, eos_token_id=None)
    assert torch.equal(out, argmax_reference(windowed, prompt, 18))


def test_windowed_batch_equals_one_by_one(windowed):
    test_batch_equals_one_by_one(windowed)  # left-padded rows: windows count real blocks only


@pytest.mark.parametrize("kind", ["block", "vanilla"])
def test_scorer_greedy_until_is_generate_cut_at_the_stop_string(tiny_dirs, tmp_path, kind):
    """lm-eval's generate_until goes through the model's own generate; the text ends before the first stop string
    and equals a token-by-token greedy loop over the full forward."""
    from blockformer.eval.scoring import Scorer
    from tiny import convert_tiny, load_original, tiny_tokenizer
    tok = tiny_tokenizer()
    model = convert_tiny(tiny_dirs["llama"], tmp_path / "b") if kind == "block" else load_original(tiny_dirs["llama"])
    context = "w5 w9 w14 w3 w22 w7"
    ids = tok.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(8):
            x = torch.tensor([ids + new])
            kw = {"anchor": torch.tensor([len(ids) - 1])} if kind == "block" else {}
            new.append(int(model(x, **kw).logits[0, -1].argmax()))
    full = tok.decode(new)
    scorer = Scorer(model, tok)
    calls, real = [], model.generate
    model.generate = lambda *a, **k: calls.append(k) or real(*a, **k)  # the one generate, not a loop of forwards
    assert scorer.greedy_until(context, [], 8) == full and len(calls) == 1
    stop = tok.decode(new[3:5])  # a stop string made of the 4th and 5th generated tokens
    cut = scorer.greedy_until(context, [stop], 8)
    assert cut == full[: full.index(stop)] and len(cut) < len(full)


@pytest.mark.slow
def test_compiled_decoding_gives_the_tokens_of_eager_decoding(tiny_dirs, tmp_path):
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b"))
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    model.compile_decoding()
    assert "run_layers" in model.token_decoder.__dict__          # the compiled step is the one generate calls
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=None), eager)
    model.compile_decoding(False)
    assert "run_layers" not in model.token_decoder.__dict__


def test_compile_decoding_routes_every_token_step_through_the_compiled_function(tiny_dirs, tmp_path, monkeypatch):
    """torch.compile stubbed by a counting identity (the real one is the slow test above): generate calls the
    compiled token-decoder step for each token after a block's first, and compile_decoding(False) is eager again."""
    calls, compiled = [], []

    def fake_compile(fn, **kw):
        compiled.append(kw)
        return lambda *a, **k: (calls.append(1), fn(*a, **k))[1]
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b"))
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    model.compile_decoding()
    assert compiled == [{"dynamic": False}]
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=None), eager) and len(calls) >= 10
    model.compile_decoding(False)
    n = len(calls)
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=None), eager) and len(calls) == n


def test_compile_flag_on_a_vanilla_model_is_one_line(tiny_dirs):
    from click.testing import CliRunner
    from blockformer.cli import main
    r = CliRunner().invoke(main, ["generate", str(tiny_dirs["llama"]), "w5 w6", "--compile", "--max-new-tokens", "2"])
    assert r.exit_code != 0 and "applies to Block Transformers" in r.output and "Traceback" not in r.output


def test_greedy_pick_is_the_first_maximum_in_every_dtype():
    # greedy decoding takes max's indices (faster than argmax on a CPU): ties must still go to the first maximum
    from blockformer.generate import Sampling, next_token
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 7.0, 7.0]])
    for dtype in (torch.float32, torch.bfloat16):
        assert next_token(logits.to(dtype), Sampling(), None).tolist() == [1, 0, 2]
    wide = torch.randint(0, 3, (32, 49152), generator=torch.Generator().manual_seed(0)).float()  # many ties
    assert torch.equal(next_token(wide, Sampling(), None), wide.argmax(-1))


@pytest.mark.parametrize("top_k", [None, 50])
@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0])  # flat (the nucleus reaches past the candidates), then peaked
def test_warp_keeps_exactly_what_hugging_faces_warpers_keep(top_k, scale):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    from blockformer.generate import Sampling, warp
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    logits[::3] *= 4  # some rows peaked, some flat: each is decided by the fewest candidates that hold its nucleus
    for top_p in (0.3, 0.9, 0.95):
        hf = LogitsProcessorList([TemperatureLogitsWarper(0.8)] + ([TopKLogitsWarper(top_k)] if top_k else []) +
                                 [TopPLogitsWarper(top_p)])(None, logits.clone())
        ours = warp(logits, Sampling(True, 0.8, top_k, top_p))
        assert torch.equal(ours.isinf(), hf.isinf()), (top_k, scale, top_p)
        torch.testing.assert_close(ours[~ours.isinf()], hf[~hf.isinf()])


def test_sampling_never_draws_a_token_of_probability_zero():
    from blockformer.generate import Sampling, next_token
    logits = torch.full((2000, 50), -math.inf)   # tokens before, between and after the two allowed ones are cut
    logits[:, [7, 20]] = torch.tensor([0.0, -1.0])
    draws = next_token(logits, Sampling(do_sample=True), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {7, 20}
    assert abs((draws == 7).float().mean().item() - 1 / (1 + math.exp(-1))) < 0.03  # e^0 / (e^0 + e^-1)
