"""Behaviour of the block model: exactness of the degenerate split, causality, padding, loss, save/load."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tiny import VOCAB, assert_causal, convert_tiny, load_block, load_original, perturb_new_parts


def ids(B=2, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


@torch.no_grad()
def test_degenerate_split_reproduces_original(tiny_dirs, family, tmp_path):
    """block_length 1 with every layer in the block decoder (empty token decoder) is the original model."""
    original = load_original(tiny_dirs[family])
    block = convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=1, block_layers=4)
    assert block.config.num_token_layers == 0
    x = ids()
    assert_close(block(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("block_length", [1, 3, 4])
def test_causal(tiny_dirs, family, tmp_path, block_length):
    """Changing tokens after position t never changes logits at positions <= t, but does change later ones."""
    model = perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=block_length))
    x = ids(B=1, T=14)
    assert_causal(model, x, (0, 2, 5, 8, 12))


@torch.no_grad()
@pytest.mark.parametrize("block_length", [2, 4])
def test_left_padding_does_not_change_real_logits(tiny_dirs, family, tmp_path, block_length):
    model = perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=block_length))
    x = ids(B=1, T=10)
    ref = model(x).logits[0]
    for pad in range(1, block_length + 2):
        padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
        batch = torch.cat([padded, torch.cat([x, torch.zeros(1, pad, dtype=torch.long)], 1)])  # left + right
        mask = torch.cat([torch.cat([torch.zeros(1, pad), torch.ones(1, 10)], 1),
                          torch.cat([torch.ones(1, 10), torch.zeros(1, pad)], 1)]).long()
        out = model(batch, attention_mask=mask).logits
        assert_close(out[0, pad:], ref, rtol=1e-5, atol=1e-5)
        assert_close(out[1, :10], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_first_prediction_depends_only_on_first_token(tiny_dirs, tmp_path):
    """The first real token closes block 0: its logits predict token 1 from token 0 alone."""
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=4))
    x = ids(B=1, T=9)
    alone = model(x[:, :1]).logits[0, 0]
    assert_close(model(x).logits[0, 0], alone, rtol=1e-5, atol=1e-6)


def test_loss_is_shifted_cross_entropy(tiny_dirs, tmp_path):
    model = convert_tiny(tiny_dirs["gpt_neox"], tmp_path / "b")
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    assert_close(out.loss, want)
    out.loss.backward()
    assert model.embedder.proj.weight.grad.abs().sum() > 0
    assert model.token_decoder.expand.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_save_load_round_trip_is_bit_identical(tiny_dirs, family, tmp_path):
    from transformers import AutoModelForCausalLM
    import blockformer  # noqa: F401
    model = perturb_new_parts(convert_tiny(tiny_dirs[family], tmp_path / "b"))
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    assert type(again).__name__ == "BlockTransformerForCausalLM"
    x = ids()
    assert torch.equal(model(x).logits, again(x).logits)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert (again.lm_head.weight is again.token_decoder.embed.weight) == model.config.tie_word_embeddings


@torch.no_grad()
def test_bf16_forward_runs_and_stays_close(tiny_dirs, tmp_path):
    model = convert_tiny(tiny_dirs["llama"], tmp_path / "b")
    x = ids()
    ref = model(x).logits
    low = load_block(tmp_path / "b").to(torch.bfloat16)(x).logits.float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("block_length", [1, 3, 4])
def test_needed_positions_decode_only_their_blocks_and_match_the_full_pass(tiny_dirs, tmp_path, block_length):
    """Scoring asks for a few positions: the token decoder runs on the blocks holding them only, same values."""
    model = convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=block_length)
    perturb_new_parts(model)
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 29))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :6] = False                                       # left padding in one row
    anchor = torch.tensor([20, 24, 9])                        # scoring anchors: the last context token per row
    need = torch.zeros_like(mask)
    need[0, 21:25], need[1, 25:], need[2, 10:12] = True, True, True
    seen = []
    hook = model.token_decoder.register_forward_hook(lambda m, a, out: seen.append(out.shape[:2]))
    with torch.no_grad():
        full = model.final_hidden(ids, mask, anchor)
        part = model.final_hidden(ids, mask, anchor, need=need)
    hook.remove()
    assert_close(part[need], full[need], rtol=1e-5, atol=1e-5)
    (B, N), (one, M) = seen                                   # full pass: every block; scoring: the needed ones
    assert one == 1 and 3 <= M <= B * N // 3


@pytest.mark.parametrize("block_length", [2, 4])
def test_choices_hidden_runs_real_blocks_only_and_matches_one_forward_per_choice(tiny_dirs, tmp_path, block_length):
    """Shared-context scoring: the block decoder reads the context once and each choice's real blocks (a short
    choice's padding blocks are left out); every choice's states equal a full forward of context + choice."""
    L = block_length
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=L))
    torch.manual_seed(5)
    ctxs, lens = [torch.randint(3, VOCAB, (n,)) for n in (3 * L, 2 * L - 1)], [(1, 3 * L), (L + 1, 2 * L)]
    conts = [[torch.randint(3, VOCAB, (n,)) for n in row] for row in lens]
    Tc, Tx = 3 * L, 3 * L
    ids, cmask = torch.zeros(2, Tc, dtype=torch.long), torch.zeros(2, Tc, dtype=torch.bool)
    xids, xmask = torch.zeros(2, 2, Tx, dtype=torch.long), torch.zeros(2, 2, Tx, dtype=torch.bool)
    for b, c in enumerate(ctxs):
        ids[b, Tc - len(c):], cmask[b, Tc - len(c):] = c, True
        for j, x in enumerate(conts[b]):
            xids[b, j, :len(x)], xmask[b, j, :len(x)] = x, True
    seen = []
    tree = model.block_decoder.tree
    model.block_decoder.tree = lambda x, pos, mask: seen.append(x.shape[1]) or tree(x, pos, mask)
    with torch.no_grad():
        h = model.choices_hidden(ids, cmask, xids, xmask)                            # (2, 2, Tx, D)
    # a choice block runs when another follows it: row 0 holds 3 context blocks + 0 + 2, row 1 2 + 1 + 1
    # (the padded layout: 3 + 2 * 2)
    assert seen == [5]
    for b in range(2):
        for j, x in enumerate(conts[b]):
            seq = torch.cat([ctxs[b], x])[None]
            want = model.final_hidden(seq, anchor=torch.tensor([len(ctxs[b]) - 1]))[0, len(ctxs[b]) - 1:-1]
            assert_close(h[b, j, :len(x)], want, rtol=1e-5, atol=1e-5)
