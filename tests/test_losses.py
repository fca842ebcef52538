"""Uptraining objectives on tiny tensors and models: alignment layer and positions, distillation against hand
computations, chunking and memory."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from tiny import VOCAB, convert_tiny


# ------------------------------------------------------------------ alignment
def _block_length_one(tiny_dirs, tmp_path, layer_map):
    """A tiny llama converted with L_B 1 (its decoders then compute the original's layers exactly) and the original."""
    from tiny import load_original
    return (convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=1, layer_map=layer_map),
            load_original(tiny_dirs["llama"]))


@pytest.mark.parametrize("layer_map", ["partition", "duplicate", "skip"])
def test_alignment_compares_the_block_decoder_with_the_matching_teacher_layer(tiny_dirs, tmp_path, layer_map):
    """With block length 1 the converted block decoder computes exactly the original's first layers, so the
    alignment loss at init is 0 when (and only when) the right teacher layer is compared."""
    from blockformer.uptrain.losses import LayerTap, alignment_loss, teacher_align_layer
    blk, teacher = _block_length_one(tiny_dirs, tmp_path, layer_map)
    if layer_map == "skip":
        with pytest.raises(BlockformerError, match="layer-map skip"):
            teacher_align_layer(blk.config, teacher)
        return
    k = teacher_align_layer(blk.config, teacher)
    assert k == {"partition": 2, "duplicate": 4}[layer_map]
    tap = LayerTap(teacher, k)
    ids, mask = torch.randint(4, VOCAB, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        _, ctx, shift = blk(ids, attention_mask=mask, return_hidden=True).hidden_states
        teacher.model(input_ids=ids, attention_mask=mask.long())
    loss, n = alignment_loss(ctx, shift, tap.take(), mask, 1)
    assert n == 24 and loss / n < 1e-8


def test_alignment_refuses_a_skip_model_in_one_line(tiny_dirs, corpus, tmp_path):
    convert_tiny(tiny_dirs["llama"], tmp_path / "b", layer_map="skip")
    r = CliRunner().invoke(main, ["uptrain", str(tmp_path / "b"), "--data", str(corpus), "--out", str(tmp_path / "o"),
                                  "--teacher", str(tiny_dirs["llama"]), "--align-weight", "0.1", "--max-steps", "1",
                                  "--seq-len", "32"])
    assert r.exit_code == 1 and "layer-map skip" in r.output and not (tmp_path / "o").exists(), r.output


def test_alignment_positions_follow_the_block_shift_and_the_mask():
    from blockformer.model import align_to_blocks
    from blockformer.uptrain.losses import alignment_loss, alignment_positions
    L, T = 4, 10
    ids, mask = torch.randint(4, VOCAB, (2, T)), torch.ones(2, T, dtype=torch.bool)
    mask[1, :2] = False   # row 1: two leading pads, so its first real token (2) closes block 0
    mask[0, 4] = False    # row 0: a pad inside the row (a document boundary)
    _, _, shift = align_to_blocks(ids, mask, L)
    assert shift.tolist() == [3, 1]
    pos, ok = alignment_positions(shift, 4, L, mask)
    assert [pos[b][ok[b]].tolist() for b in range(2)] == [[0, 8], [2, 6]]
    teacher_hidden = torch.arange(T).float()[None, :, None].expand(2, T, 3)  # the value is the position
    loss, n = alignment_loss(torch.zeros(2, 4, 3), shift, teacher_hidden, mask, L)
    assert n == 4 and loss.item() == pytest.approx(0 + 64 + 4 + 36)


# ------------------------------------------------------------------ losses
def _head_and_batch(seed=0, d=8, vocab=20):
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False)
    h = torch.randn(2, 7, d, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 7))
    labels[0, 3] = labels[1, 1] = -100
    return head, h, labels


# ------------------------------------------------------------------ layer-wise distillation of the token decoder
@pytest.mark.parametrize("layer_map", ["partition", "duplicate", "skip"])
def test_layerwise_loss_compares_each_token_decoder_layer_with_its_source_layer(tiny_dirs, tmp_path, layer_map):
    """Block length 1, one-token rows: the block decoder is the original's first layers and the token decoder reads
    only the prefix made of its output, so each token-decoder layer computes exactly its source layer of the
    teacher and the layer-wise loss is 0 when (and only when) the right teacher layers are compared."""
    from blockformer.families import family_for
    from blockformer.model import prediction_slots
    from blockformer.uptrain.losses import MultiTap, layerwise_state_loss, teacher_token_layers
    blk, teacher = _block_length_one(tiny_dirs, tmp_path, layer_map)
    if layer_map == "skip":
        with pytest.raises(BlockformerError, match="--layer-map partition"):
            teacher_token_layers(blk.config, teacher)
        return
    src = teacher_token_layers(blk.config, teacher)
    assert src == {"partition": [2, 3], "duplicate": [0, 1, 2, 3]}[layer_map]
    if layer_map == "duplicate":  # its token decoder reads layer 3's output, so no teacher layer is matched exactly
        return
    layers = teacher.get_submodule(family_for("llama").layers)
    mine, upper, wrong = (MultiTap(list(blk.token_decoder.layers)), MultiTap([layers[i] for i in src]),
                          MultiTap([layers[3 - i] for i in range(len(src))]))
    ids, mask = torch.randint(4, VOCAB, (3, 1)), torch.ones(3, 1, dtype=torch.bool)
    with torch.no_grad():
        _, _, shift = blk(ids, attention_mask=mask, return_hidden=True).hidden_states
        teacher.model(input_ids=ids, attention_mask=mask.long())
    idx, valid, p = prediction_slots(1, shift, 1), mask, blk.config.prefix_length
    student = mine.take()
    assert layerwise_state_loss(student, upper.take(), idx, valid, p) < 1e-9
    assert layerwise_state_loss(student, wrong.take(), idx, valid, p) > 1e-3


def test_layerwise_states_sit_where_the_final_hidden_states_are_read(tiny_dirs, tmp_path):
    """The last token-decoder layer's state at each position's prediction slot, normalised, is the model's final
    hidden state there: the slot mapping the loss uses is the forward pass's own (padding and shift included)."""
    from blockformer.model import prediction_slots
    from blockformer.uptrain.losses import MultiTap, predicting_states
    blk = convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=4)
    tap = MultiTap(list(blk.token_decoder.layers))
    ids, mask = torch.randint(4, VOCAB, (2, 11)), torch.ones(2, 11, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        h, _, shift = blk(ids, attention_mask=mask, return_hidden=True).hidden_states
    got = blk.token_decoder.norm(predicting_states(tap.take()[-1], prediction_slots(11, shift, 4),
                                                   blk.config.prefix_length))
    torch.testing.assert_close(got[mask], h[mask])


def test_layerwise_loss_matches_a_hand_computation():
    """Relative squared error per valid position, summed, then averaged over the layers."""
    from blockformer.uptrain.losses import layerwise_state_loss
    p, L = 1, 2                                  # one prefix slot, blocks of 2: the window is 2 slots
    s1 = torch.tensor([[[1., 0.], [0., 2.]], [[3., 0.], [0., 0.]]])  # (B*N = 2, p + L - 1 = 2, D = 2)
    s2 = torch.zeros_like(s1)
    t = torch.tensor([[[1., 1.], [0., 1.], [2., 0.], [5., 5.]]])     # (B = 1, T = 4, D = 2)
    idx = torch.tensor([[0, 1, 2, 3]])
    valid = torch.tensor([[True, True, True, False]])
    # layer 1: |(1,0)-(1,1)|^2/2 = 0.5, |(0,2)-(0,1)|^2/1 = 1, |(3,0)-(2,0)|^2/4 = 0.25; layer 2: 1 + 1 + 1
    assert layerwise_state_loss([s1, s2], [t, t], idx, valid, p).item() == pytest.approx((1.75 + 3) / 2)


def test_layerwise_loss_needs_a_teacher_and_a_partition(tiny_dirs, corpus, tmp_path):
    args = ["uptrain", str(tmp_path / "b"), "--data", str(corpus), "--out", str(tmp_path / "o"), "--max-steps", "1",
            "--seq-len", "32", "--hidden-weight", "0.5"]
    convert_tiny(tiny_dirs["llama"], tmp_path / "b", layer_map="skip")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "needs a teacher" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--teacher", str(tiny_dirs["llama"])])
    assert r.exit_code == 1 and "--hidden-weight 0" in r.output and not (tmp_path / "o").exists(), r.output


def test_uptraining_with_the_layerwise_loss_lowers_it_and_leaves_no_hooks(tiny_dirs, corpus, tmp_path, monkeypatch):
    from blockformer.uptrain import UptrainConfig, uptrain
    from blockformer.uptrain.losses import Guide
    closed, close = [], Guide.close
    monkeypatch.setattr(Guide, "close", lambda self: (closed.append(self), close(self)))  # every run closes its Guide
    convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=2)
    cfg = dict(teacher=str(tiny_dirs["llama"]), kd_weight=1.0, seq_len=32, batch_size=2, warmup_steps=1, lr=3e-3,
               save_every=8, eval_every=8)
    base = uptrain(UptrainConfig(str(tmp_path / "b"), str(corpus), tmp_path / "kd", max_steps=8, **cfg))
    hid = uptrain(UptrainConfig(str(tmp_path / "b"), str(corpus), tmp_path / "hid", max_steps=8, hidden_weight=10.0,
                                **cfg))
    first, last = hid["history"][0]["loss"], hid["history"][-1]["loss"]
    assert hid["history"][0]["loss"] > base["history"][0]["loss"] + 1e-3   # the extra term is in the loss
    assert last < first
    assert len(closed) == 2 and closed[0] is not closed[1]


def test_the_guide_removes_every_hook_it_set(tiny_dirs, tmp_path):
    """uptrain closes its Guide, so a model trained in this process (the pipeline evaluates it next) keeps no hook
    that would hold on to its layers' outputs."""
    from tiny import load_original
    from blockformer.uptrain import UptrainConfig
    from blockformer.uptrain.losses import Guide
    blk = convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=2)
    teacher = load_original(tiny_dirs["llama"])
    cfg = UptrainConfig("b", "d", tmp_path / "o", teacher="t", align_weight=0.1, hidden_weight=0.1, max_steps=1)
    modules = list(blk.token_decoder.layers) + list(teacher.model.layers)
    guide = Guide.build(cfg, blk, teacher)
    assert sum(len(m._forward_hooks) for m in modules) == 2 + 2 + 1
    guide.close()
    assert sum(len(m._forward_hooks) for m in modules) == 0


def test_distillation_is_zero_for_a_teacher_identical_to_the_student():
    from blockformer.uptrain.losses import token_loss
    head, h, labels = _head_and_batch()
    loss, n = token_loss(h, labels, head, (h.detach(), head), temperature=2.0, kd_weight=1.0)
    assert n == 10 and abs(loss.item()) < 1e-5


def test_distillation_matches_a_hand_computation_with_the_t2_factor():
    import torch.nn.functional as F
    from blockformer.uptrain.losses import token_loss
    head, h, labels = _head_and_batch()
    t_head, _, _ = _head_and_batch(seed=1)
    th = torch.randn(2, 7, 8)
    T, w = 2.0, 0.3
    loss, _ = token_loss(h, labels, head, (th, t_head), temperature=T, kd_weight=w)
    valid = labels[:, 1:] != -100
    s, t = head(h[:, :-1][valid]), t_head(th[:, :-1][valid])
    ce = F.cross_entropy(s, labels[:, 1:][valid], reduction="sum")
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum()
    assert loss.item() == pytest.approx((1 - w) * ce.item() + w * T * T * kl.item(), rel=1e-5)


def test_weighted_loss_matches_a_hand_computation_per_position():
    import torch.nn.functional as F
    from blockformer.uptrain.losses import token_loss
    head, h, labels = _head_and_batch()
    t_head, _, _ = _head_and_batch(seed=1)
    th, weight = torch.randn(2, 7, 8), torch.rand(2, 7) * 3
    T, w = 1.5, 0.4
    loss, n = token_loss(h, labels, head, (th, t_head), temperature=T, kd_weight=w, weight=weight, chunk=3)
    valid = labels[:, 1:] != -100
    s, t, wt = head(h[:, :-1][valid]), t_head(th[:, :-1][valid]), weight[:, :-1][valid]
    ce = F.cross_entropy(s, labels[:, 1:][valid], reduction="none")
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1)
    assert n == 10
    assert loss.item() == pytest.approx((((1 - w) * ce + w * T * T * kl) @ wt).item(), rel=1e-5)
    ones, _ = token_loss(h, labels, head, (th, t_head), temperature=T, kd_weight=w, weight=torch.ones(2, 7))
    plain, _ = token_loss(h, labels, head, (th, t_head), temperature=T, kd_weight=w)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)


def test_block_start_weights_mark_the_predictions_of_each_blocks_first_token(tiny_dirs, tmp_path):
    """Where the weight is `start_weight`, the token predicted is the first of its block in the model's own
    alignment (checked against where the model puts each token), and the mean weight per block is 1."""
    from blockformer.model import align_to_blocks
    from blockformer.uptrain.losses import block_start_weights
    L, T = 4, 11
    ids = torch.arange(1, T + 1).repeat(2, 1)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :2] = False                                                       # row 1: two leading pads
    aligned, _, shift = align_to_blocks(ids, mask, L)
    w = block_start_weights(T, shift, L, 3.0)
    for b in range(2):
        for t in range(T - 1):
            q = (aligned[b] == ids[b, t + 1]).nonzero().item()               # aligned slot of token t + 1
            assert (w[b, t] > 1) == (q % L == 0)
    assert w[0, :8].sum().item() == pytest.approx(8.0) and w.max().item() == pytest.approx(3 * 4 / 6)


def test_loss_and_gradients_do_not_depend_on_the_chunk_size():
    from blockformer.uptrain.losses import token_loss
    head, h, labels = _head_and_batch()
    t_head, _, _ = _head_and_batch(seed=1)
    th = torch.randn(2, 7, 8)
    got = []
    for chunk in (1, 3, 512):
        h.grad, head.weight.grad = None, None
        loss, _ = token_loss(h, labels, head, (th, t_head), temperature=1.5, kd_weight=0.5, chunk=chunk)
        loss.backward()
        got.append((loss.item(), h.grad.clone(), head.weight.grad.clone()))
    for loss, gh, gw in got[1:]:
        assert loss == pytest.approx(got[0][0], rel=1e-6)
        assert torch.allclose(gh, got[0][1], atol=1e-6) and torch.allclose(gw, got[0][2], atol=1e-6)


def test_teacher_logits_are_not_kept_alive_until_backward():
    import gc
    import weakref
    from blockformer.uptrain.losses import token_loss
    head, h, labels = _head_and_batch()
    refs = []

    class RecordingHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 20, bias=False)

        def forward(self, x):
            out = self.lin(x)
            refs.append(weakref.ref(out))
            return out
    loss, _ = token_loss(h, labels, head, (torch.randn(2, 7, 8), RecordingHead()), kd_weight=0.5, chunk=3)
    gc.collect()
    assert refs and all(r() is None for r in refs)  # each chunk's teacher logits were freed with the chunk
    loss.backward()
    assert torch.isfinite(h.grad).all()


def test_losses_and_scores_apply_the_final_softcap_of_student_and_teacher(tmp_path):
    """Gemma 2 caps its logits: chunked losses from hidden states must equal the models' own forward."""
    from blockformer.convert import ConvertConfig, convert
    from blockformer.eval.scoring import Scorer
    from blockformer.model import output_head
    from blockformer.uptrain.losses import token_loss
    from tiny import build_original_a, load_block, load_original, tiny_tokenizer
    src = tmp_path / "g2"
    build_original_a("gemma2").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    convert(ConvertConfig(str(src), tmp_path / "blk", block_length=4))
    orig, blk = load_original(src), load_block(tmp_path / "blk")
    ids = torch.randint(3, 96, (2, 21))
    with torch.no_grad():
        for model, h in ((blk, blk(ids, return_hidden=True).hidden_states[0]),
                         (orig, orig.base_model(input_ids=ids).last_hidden_state)):
            logits = model(ids).logits
            assert logits.abs().max() <= 3.0  # the cap bites
            loss, n = token_loss(h, ids, output_head(model))
            want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
        tok = tiny_tokenizer()
        ctx, cont = "w5 w6 w7 w8 w9", " w10 w11"
        (ll, _), = Scorer(orig, tok).loglikelihood([(ctx, cont)])
        full = torch.tensor([tok.encode(ctx + cont)])
        lp = torch.log_softmax(orig(full).logits[0, :-1], -1)
        want = lp[-2:].gather(1, full[0, -2:, None]).sum().item()
        assert abs(ll - want) < 1e-4
