"""`convert --embedder-layers k`: the original's k lowest layers run inside each block by the embedder."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from blockformer.costs import predict
from blockformer.errors import BlockformerError
from blockformer.model import scaled_lookup
from blockformer.uptrain.losses import teacher_align_layer
from tiny import VOCAB, argmax_reference, assert_causal, convert_tiny, load_block, load_original, perturb_new_parts


def ids(B=1, T=13, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=[False, True], ids=["table", "bridge"])
def local(tiny_dirs, family, tmp_path, request):
    """4 tiny layers: the embedder runs layers 0-1 per block, the block decoder 2, the token decoder 3; with and
    without local token inputs (the bridge, perturbed away from 0 so that it counts)."""
    return perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=4, block_layers=3,
                                          embedder_layers=2, local_token_inputs=request.param))


@torch.no_grad()
def test_local_layers_give_the_originals_states_of_a_block_that_starts_a_text(tiny_dirs, family, local):
    """A block seen alone is a text of L_B tokens: the embedder's states are the original's entering layer 2."""
    x = ids(T=4)
    e = scaled_lookup(local.embedder.embed, x[:, None], local.embedder.scale)             # (1, 1, 4, D)
    got = local.embedder.contextualise(e, torch.ones(1, 1, 4, dtype=torch.bool))[:, 0]
    want = load_original(tiny_dirs[family])(x, output_hidden_states=True).hidden_states[2]
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert local.config.provenance["embedder_layers_from"] == [0, 1]
    assert local.config.provenance["block_layers_from"] == [2]


@torch.no_grad()
def test_local_layers_change_the_block_vector(tiny_dirs, family, tmp_path, local):
    """Not a no-op: the same conversion without them gives another block vector."""
    plain = perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "p", block_length=4, block_layers=3))
    x = ids(T=8).view(1, 2, 4)
    m = torch.ones_like(x, dtype=torch.bool)
    assert not torch.allclose(local.embedder(x, m), plain.embedder(x, m), atol=1e-3)


@torch.no_grad()
def test_causal_and_padding_with_local_layers(local):
    assert_causal(local, ids(T=14), (0, 2, 5, 8, 12))
    x = ids(T=10)
    ref = local(x).logits[0]
    for pad in (1, 3, 5):
        padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
        mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 10)], 1).long()
        assert_close(local(padded, attention_mask=mask).logits[0, pad:], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_generation_with_local_layers_equals_forward_argmax(local, prompt_len):
    prompt = ids(T=prompt_len, seed=prompt_len)
    assert torch.equal(local.generate(prompt, max_new_tokens=10, eos_token_id=None),
                       argmax_reference(local, prompt, 10))


@torch.no_grad()
def test_local_layers_save_and_load_bit_identical(local, tmp_path):
    local.save_pretrained(tmp_path / "s")
    again = load_block(tmp_path / "s")
    assert again.config.embedder_layers == 2
    assert again.config.local_token_inputs == local.config.local_token_inputs
    x = ids(T=11)
    assert torch.equal(again(x).logits, local(x).logits)


def test_embedder_layers_must_leave_the_block_decoder_a_layer(tiny_dirs, tmp_path):
    with pytest.raises(BlockformerError, match="leaves the block decoder no layer"):
        convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_layers=2, embedder_layers=2)
    with pytest.raises(BlockformerError, match="0 or more"):
        convert_tiny(tiny_dirs["llama"], tmp_path / "c", embedder_layers=-1)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_alignment_counts_the_embedders_layers(tiny_dirs, local):
    """The block decoder's output still corresponds to the teacher after layer 3 (layers 0-1, then 2)."""
    assert teacher_align_layer(local.config, load_original(tiny_dirs["llama"])) == 3


def test_cost_model_charges_the_local_layers(local):
    """Moving layers from the block decoder into the embedder leaves the original's cost alone and makes the block
    model's prefill dearer: each now runs on every token instead of once per block."""
    c = local.config
    moved = type(c).from_dict({**c.to_dict(), "embedder_layers": 0, "embedder_windows": None,
                               "num_block_layers": c.num_block_layers + 2})
    a = predict(c, 512, 64, 4, 4, 1e11, 1e10)
    b = predict(moved, 512, 64, 4, 4, 1e11, 1e10)
    assert a["original_s"] == pytest.approx(b["original_s"])
    assert a["block_s"] > b["block_s"]


@pytest.mark.parametrize("bridge", [False, True])
def test_scorer_shared_context_path_equals_the_plain_path_with_local_layers(tiny_dirs, tmp_path, monkeypatch, bridge):
    """Multiple-choice scoring runs each context once through the tree mask; with the embedder's local layers (and
    local token inputs) it must still score what one plain forward per choice does."""
    import random
    from blockformer.eval.scoring import Scorer
    from tiny import tiny_tokenizer
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=4, block_layers=3,
                                           embedder_layers=2, local_token_inputs=bridge))
    rng = random.Random(3)
    words = lambda k: " ".join(f"w{rng.randrange(4, 90)}" for _ in range(k))  # noqa: E731
    items = [[(ctx, " " + words(rng.randint(1, 9))) for _ in range(n)]
             for ctx, n in ((words(rng.randint(9, 40)), rng.choice([2, 4])) for _ in range(9))]
    scorer, calls = Scorer(model, tiny_tokenizer(), batch_tokens=400), []
    shared = scorer._score_shared
    monkeypatch.setattr(scorer, "_score_shared", lambda its: calls.append(len(its)) or shared(its))
    got = [r for item in scorer.loglikelihood_choices(items) for r in item]
    assert sum(calls) >= len(items) - 2
    want = Scorer(model, tiny_tokenizer(), batch_tokens=96).loglikelihood([p for it in items for p in it])
    assert_close(torch.tensor([r[0] for r in got]), torch.tensor([r[0] for r in want]), rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_a_sink_opens_each_block_as_bos_opens_a_text(tiny_dirs, family, tmp_path):
    """--embedder-sink: the block's states are the original's at positions 1.. of [BOS (or token 0), the block]."""
    model = convert_tiny(tiny_dirs[family], tmp_path / "s", block_length=4, block_layers=3, embedder_layers=2,
                         embedder_sink=True)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    x = ids(T=4)
    e = scaled_lookup(model.embedder.embed, x[:, None], model.embedder.scale)
    got = model.embedder.contextualise(e, torch.ones(1, 1, 4, dtype=torch.bool))[:, 0]
    text = torch.cat([torch.tensor([[bos]]), x], 1)
    want = load_original(tiny_dirs[family])(text, output_hidden_states=True).hidden_states[2][:, 1:]
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    perturb_new_parts(model)
    assert_causal(model, ids(T=14), (0, 2, 5, 8, 12))
    x = ids(T=10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    assert_close(model(padded, attention_mask=mask).logits[0, 3:], model(x).logits[0], rtol=1e-5, atol=1e-5)
    prompt = ids(T=6, seed=6)
    assert torch.equal(model.generate(prompt, max_new_tokens=9, eos_token_id=None), argmax_reference(model, prompt, 9))


def test_a_sink_needs_local_layers(tiny_dirs, tmp_path):
    with pytest.raises(BlockformerError, match="needs --embedder-layers"):
        convert_tiny(tiny_dirs["llama"], tmp_path / "s", embedder_sink=True)


def test_lora_adapts_the_local_layers_and_trains_the_sink(tiny_dirs, tmp_path):
    from types import SimpleNamespace
    from blockformer.uptrain.train import prepare_trainable
    model = convert_tiny(tiny_dirs["llama"], tmp_path / "s", block_layers=3, embedder_layers=2, embedder_sink=True)
    peft = prepare_trainable(model, SimpleNamespace(lora_rank=2, lora_alpha=4, freeze=[]))
    trained = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any("embedder.local.layers.1.attn.q" in n and "lora_A" in n for n in trained)
    assert any(n.endswith("embedder.sink") for n in trained)
    assert not any("embedder.local.layers.0.attn.q.base_layer" in n for n in trained)


def test_the_probe_predicts_the_model_it_stands_for(tiny_dirs, tmp_path):
    """bench/local_embedder.py's "local 2/4 sink none" on a plain conversion is the loss of the conversion with
    --embedder-layers 2 whose projection passes the block's last state (the contextual init with mix 0)."""
    import importlib.util
    import json
    from pathlib import Path
    from click.testing import CliRunner
    path = Path(__file__).resolve().parents[1] / "bench" / "local_embedder.py"
    spec = importlib.util.spec_from_file_location("local_embedder", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    convert_tiny(tiny_dirs["llama"], tmp_path / "plain", block_length=4, block_layers=3)
    local = convert_tiny(tiny_dirs["llama"], tmp_path / "local", block_length=4, block_layers=3, embedder_layers=2)
    with torch.no_grad():  # the projection passes the last token's state, as --init contextual with mix 0 sets it
        D = local.config.hidden_size
        local.embedder.proj.weight.copy_(torch.cat([torch.zeros(D, 3 * D), torch.eye(D)], 1))
        local.embedder.proj.bias.zero_()
    local.save_pretrained(tmp_path / "local")
    res = {}
    for name, extra in (("plain", ["--k", "2", "--window", "4", "--sink", "none"]), ("local", ["--k", "1"])):
        r = CliRunner().invoke(probe.main, ["--source", str(tiny_dirs["llama"]), "--model", str(tmp_path / name),
                                            "--tokens", "256", "--rows", "64", "--json-out", str(tmp_path / "o.json"),
                                            *extra])
        assert r.exit_code == 0, r.output
        res[name] = json.loads((tmp_path / "o.json").read_text())["variants"]
    want = res["local"]["model"]["per_position"]
    assert res["plain"]["local 2/4 sink none"]["per_position"] == pytest.approx(want, abs=1e-4)
    assert res["plain"]["model"]["per_position"] != pytest.approx(want, abs=1e-3)


# ------------------------------------------------------------------ --local-token-inputs: the bridge
@pytest.fixture
def bridged(tiny_dirs, family, tmp_path):
    """The local fixture's layout, plus token-decoder inputs that read the embedder's states (bridge perturbed)."""
    return perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "lb", block_length=4, block_layers=3,
                                          embedder_layers=2, embedder_sink=True, local_token_inputs=True))


@torch.no_grad()
def test_bridge_is_zero_after_a_paper_conversion_so_the_model_is_unchanged(tiny_dirs, tmp_path):
    kw = dict(block_length=4, block_layers=3, embedder_layers=2, embedder_sink=True)
    plain = convert_tiny(tiny_dirs["llama"], tmp_path / "p", **kw)
    bridged = convert_tiny(tiny_dirs["llama"], tmp_path / "b", local_token_inputs=True, **kw)
    assert torch.count_nonzero(bridged.token_decoder.bridge.weight) == 0
    x = ids(T=15)
    assert torch.equal(bridged(x).logits, plain(x).logits)


@torch.no_grad()
def test_bridge_reads_the_next_blocks_own_states(bridged):
    """Token decoder inputs for block i+1 add bridge(the embedder's states of block i+1's tokens): computed by hand."""
    x = ids(T=12)                                                     # anchor first: 3 pads, then blocks of 4
    blocks = torch.cat([torch.zeros(1, 3, dtype=torch.long), x, torch.zeros(1, 1, dtype=torch.long)], 1).view(1, 4, 4)
    bmask = torch.cat([torch.zeros(1, 3), torch.ones(1, 12), torch.zeros(1, 1)], 1).bool().view(1, 4, 4)
    vec, states = bridged.embedder(blocks, bmask, with_states=True)
    ctx = bridged.block_decoder(vec, bmask.any(-1))
    td = bridged.token_decoder
    h = td(ctx[:, 1:2], blocks[:, 2:3, :3], bmask[:, 2:3, :3], states[:, 2:3, :3])   # block 2 from context 1
    want = bridged.logits(td.norm(h[0, 0]))                           # predicts x[5 .. 8]: positions 4 .. 7
    assert_close(bridged(x).logits[0, 4:8], want, rtol=1e-5, atol=1e-5)
    zero = torch.zeros_like(states[:, 2:3, :3])
    assert not torch.allclose(td(ctx[:, 1:2], blocks[:, 2:3, :3], bmask[:, 2:3, :3], zero), h, atol=1e-4)


def test_cost_model_charges_the_bridge_per_decoded_token_only(bridged):
    """Local token inputs rerun the local layers at each decoding step: dearer decoding, the same prefill."""
    c = bridged.config
    plain = type(c).from_dict({**c.to_dict(), "local_token_inputs": False})
    assert predict(c, 512, 64, 4, 4, 1e11, 1e10)["block_s"] > predict(plain, 512, 64, 4, 4, 1e11, 1e10)["block_s"]
    assert predict(c, 512, 0, 4, 4, 1e11, 1e10)["block_s"] == predict(plain, 512, 0, 4, 4, 1e11, 1e10)["block_s"]


@torch.no_grad()
def test_contextual_init_fits_the_bridge_to_the_originals_split_states(tiny_dirs, tmp_path):
    """The fit removes the share of the table's squared error that it reports, measured here by hand."""
    from blockformer.convert.contextual import calibration_rows
    from tiny import tiny_tokenizer
    kw = dict(block_length=4, block_layers=3, embedder_layers=2, embedder_sink=True, init="contextual",
              calib_tokens=512)
    data = tmp_path / "calib.txt"
    rng = torch.Generator().manual_seed(0)
    data.write_text(" ".join(f"w{int(i)}" for i in torch.randint(4, 90, (3000,), generator=rng)))
    m = convert_tiny(tiny_dirs["llama"], tmp_path / "b", local_token_inputs=True, calib_data=str(data), **kw)
    share = m.config.provenance["init"]["bridge_error_removed"]
    assert 0.05 < share < 1
    original = load_original(tiny_dirs["llama"])
    rows = calibration_rows(tiny_tokenizer(), str(data), 512, min(512, original.config.max_position_embeddings))
    h = original(rows, output_hidden_states=True).hidden_states[3]   # entering layer 3
    blocks = rows.view(len(rows), -1, 4)
    st = m.embedder.states(blocks, torch.ones_like(blocks, dtype=torch.bool))[:, :, :3]
    table = scaled_lookup(m.token_decoder.embed, blocks[:, :, :3], m.token_decoder.scale)
    target = h.view(len(rows), -1, 4, h.shape[-1])[:, :, :3]
    err = lambda pred: (pred - target).flatten(1, 2)[:, 1:].pow(2).sum()  # every row's first token left out  # noqa: E731
    removed = 1 - err(table + m.token_decoder.bridge(st)) / err(table)
    assert_close(removed, torch.tensor(share), rtol=1e-3, atol=1e-3)


def test_local_token_inputs_need_local_layers(tiny_dirs, tmp_path):
    with pytest.raises(BlockformerError, match="needs --embedder-layers"):
        convert_tiny(tiny_dirs["llama"], tmp_path / "s", local_token_inputs=True)
