"""Uptraining objectives: cross-entropy, distillation from the original, block-decoder alignment.

The vocabulary projection is applied in chunks of positions under activation checkpointing, so neither the
student's nor the teacher's (positions x vocabulary) logits are ever held whole: the teacher's logits of a chunk are
computed inside the checkpointed function from its hidden states, so they are freed with the chunk (and recomputed
in backward) instead of being kept alive, as checkpoint arguments, until the backward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import BlockformerError
from ..families import family_for


def _chunk_loss(h, target, t_h, t_head, head, temperature: float, kd_weight: float):
    """Summed loss of one chunk: (1 - w) * CE + w * T^2 * KL(teacher || student) at temperature T."""
    logits = head(h).float()
    loss = (1 - kd_weight) * F.cross_entropy(logits, target, reduction="sum") if kd_weight < 1 else logits.sum() * 0
    if t_h is not None and kd_weight > 0:
        with torch.no_grad():
            t = F.log_softmax(t_head(t_h).float() / temperature, -1)
        s = F.log_softmax(logits / temperature, -1)
        kl = (t.exp() * (t - s)).sum()
        loss = loss + kd_weight * temperature ** 2 * kl
    return loss


def token_loss(h, labels, head, teacher=None, temperature=1.0, kd_weight=0.0, chunk=512):
    """Summed loss over the predicted positions and their count; `teacher` = (hidden (B, T, D), head) or None.

    Position t of `h` predicts `labels[:, t + 1]`.
    """
    valid = labels[:, 1:] != -100
    hs, target = h[:, :-1][valid], labels[:, 1:][valid]                          # (n, D), (n,)
    th = teacher[0][:, :-1][valid].detach() if teacher is not None else None
    t_head = teacher[1] if teacher is not None else None
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk):
        t_chunk = th[i:i + chunk] if th is not None else None
        total = total + checkpoint(_chunk_loss, hs[i:i + chunk], target[i:i + chunk], t_chunk, t_head, head,
                                   temperature, kd_weight, use_reentrant=False)
    return total, int(valid.sum())


# ------------------------------------------------------------------------------------------------ alignment
def teacher_align_layer(config, teacher) -> int:
    """How many teacher layers the block decoder's output corresponds to (the teacher state after layer k - 1).

    That is defined only when the block decoder holds the original's first k layers in order (--layer-map
    partition, or duplicate, which gives it every layer); with skip it holds layers 0, 2, 4, ... and its output
    matches no layer of the original.
    """
    src = list(config.provenance.get("block_layers_from") or range(config.num_block_layers))
    layer_map = config.provenance.get("layer_map", "partition")
    if src != list(range(len(src))):
        raise BlockformerError(f"align_weight (--align-weight): this model's block decoder holds original layers "
                               f"{', '.join(map(str, src))} (--layer-map {layer_map}), whose output matches no layer "
                               f"of the teacher; use --align-weight 0 or a model converted with --layer-map partition")
    tc = teacher.config
    if tc.hidden_size != config.hidden_size or tc.num_hidden_layers < len(src):
        raise BlockformerError(f"align_weight (--align-weight): the teacher (hidden size {tc.hidden_size}, "
                               f"{tc.num_hidden_layers} layers) is not the model this one was converted from")
    return len(src)


class LayerTap:
    """Keeps the output of teacher layer `k - 1` during its forward pass: the residual stream after k layers, before
    any final norm (Hugging Face's last `hidden_states` entry is already normalised, so it cannot serve k = all)."""

    def __init__(self, teacher, k: int):
        layers = teacher.get_submodule(family_for(teacher.config.model_type).layers)
        self.out = None
        self.handle = layers[k - 1].register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.out = output[0] if isinstance(output, tuple) else output

    def take(self):
        out, self.out = self.out, None
        return out


def alignment_positions(shift, n_blocks: int, block_length: int, mask):
    """Original position of the token that closes each block (B, N), and whether that block is compared: the
    position exists and is a real (unpadded) token. Block j spans aligned positions jL .. jL+L-1 and aligned
    position q is original position q - shift."""
    L, T = block_length, mask.shape[1]
    pos = torch.arange(n_blocks, device=mask.device) * L + L - 1 - shift[:, None]
    ok = (pos >= 0) & (pos < T)
    pos = pos.clamp(0, T - 1)
    return pos, ok & mask.bool().gather(1, pos)


def alignment_loss(ctx, shift, teacher_hidden, mask, block_length: int):
    """Summed MSE between the block decoder's output for each block and the teacher's hidden state (at the layer
    given by `teacher_align_layer`) at the token that closes that block, and the number of blocks compared."""
    pos, ok = alignment_positions(shift, ctx.shape[1], block_length, mask)
    target = teacher_hidden.gather(1, pos[..., None].expand(-1, -1, ctx.shape[-1]))
    err = ((ctx.float() - target.float()) ** 2).mean(-1)
    return (err * ok).sum(), int(ok.sum())
