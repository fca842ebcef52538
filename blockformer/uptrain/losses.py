"""Uptraining objectives: cross-entropy, distillation from the original, block-decoder alignment, and layer-wise
distillation of the token decoder's states.

The vocabulary projection is applied in chunks of positions under activation checkpointing, so neither the
student's nor the teacher's (positions x vocabulary) logits are ever held whole: the teacher's logits of a chunk are
computed inside the checkpointed function from its hidden states, so they are freed with the chunk (and recomputed
in backward) instead of being kept alive, as checkpoint arguments, until the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import BlockformerError
from ..families import family_for


def _chunk_loss(h, target, t_h, t_head, head, temperature: float, kd_weight: float, weight=None):
    """Summed loss of one chunk: (1 - w) * CE + w * T^2 * KL(teacher || student) at temperature T; `weight` (n,)
    scales each position's term (None: all 1)."""
    logits = head(h).float()
    if kd_weight < 1:
        ce = F.cross_entropy(logits, target, reduction="none" if weight is not None else "sum")
        loss = (1 - kd_weight) * (ce @ weight if weight is not None else ce)
    else:
        loss = logits.sum() * 0
    if t_h is not None and kd_weight > 0:
        with torch.no_grad():
            t = F.log_softmax(t_head(t_h).float() / temperature, -1)
        s = F.log_softmax(logits / temperature, -1)
        kl = t.exp() * (t - s)                                                  # (n, V)
        loss = loss + kd_weight * temperature ** 2 * (kl.sum(-1) @ weight if weight is not None else kl.sum())
    return loss


def predicting(labels):
    """(B, T) bool: the positions whose next token has a label (the positions every loss here scores)."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    return valid


def token_loss(h, labels, head, teacher=None, temperature=1.0, kd_weight=0.0, chunk=512, weight=None):
    """Summed loss over the predicted positions and their count; `teacher` = (hidden (B, T, D), head) or None;
    `weight` (B, T) scales each position's term (None: all 1).

    Position t of `h` predicts `labels[:, t + 1]`.
    """
    valid = predicting(labels)
    w = weight[valid].float() if weight is not None else None
    hs, target = h[valid], labels[:, 1:][valid[:, :-1]]                          # (n, D), (n,)
    th = teacher[0][valid].detach() if teacher is not None else None
    t_head = teacher[1] if teacher is not None else None
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk):
        t_chunk = th[i:i + chunk] if th is not None else None
        w_chunk = w[i:i + chunk] if w is not None else None
        total = total + checkpoint(_chunk_loss, hs[i:i + chunk], target[i:i + chunk], t_chunk, t_head, head,
                                   temperature, kd_weight, w_chunk, use_reentrant=False)
    return total, int(valid.sum())


def block_start_weights(T: int, shift, L: int, start_weight: float):
    """(B, T): weight of each position's prediction: `start_weight` where it predicts the first token of a block, 1
    elsewhere, scaled so that the mean over a block is 1 (the loss keeps its scale, only its mix moves).

    Position t predicts original token t + 1, which sits at aligned position t + 1 + shift (model.align_to_blocks)."""
    starts = (torch.arange(T, device=shift.device) + 1 + shift[:, None]) % L == 0
    return torch.where(starts, start_weight, 1.0) * (L / (start_weight + L - 1))


# ------------------------------------------------------------------------------------------------ alignment
def teacher_align_layer(config, teacher) -> int:
    """How many teacher layers the block decoder's output corresponds to (the teacher state after layer k - 1).

    That is defined only when the block decoder holds the original's first k layers in order (--layer-map
    partition, or duplicate, which gives it every layer); with skip it holds layers 0, 2, 4, ... and its output
    matches no layer of the original.
    """
    src = list(config.provenance.get("block_layers_from") or range(config.num_block_layers))
    src = list(config.provenance.get("embedder_layers_from", [])) + src  # the embedder's layers come first
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
        self.taps = MultiTap(teacher.get_submodule(family_for(teacher.config.model_type).layers)[k - 1:k])

    def take(self):
        return self.taps.take()[0]


class MultiTap:
    """Keeps the outputs of several layers (any modules) during one forward pass, in the order given."""

    def __init__(self, modules):
        self.out = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._keeper(i)) for i, m in enumerate(modules)]

    def _keeper(self, i: int):
        def keep(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output
        return keep

    def take(self) -> list:
        out, self.out = self.out, [None] * len(self.out)
        return out


# ------------------------------------------------------------------------------------------ layer-wise states
def teacher_token_layers(config, teacher) -> list[int]:
    """The teacher layers whose outputs the token decoder's layers reproduce: the layers it was copied from.

    Defined only when they are the original's last layers in order (--layer-map partition): each token-decoder
    layer then sits where its source layer sat, reading (ideally) the same residual stream."""
    src = list(config.provenance.get("token_layers_from") or [])
    n = teacher.config.num_hidden_layers
    if not src or src != list(range(n - len(src), n)) or teacher.config.hidden_size != config.hidden_size:
        raise BlockformerError(f"hidden_weight (--hidden-weight): this model's token decoder holds original layers "
                               f"{', '.join(map(str, src)) or '(unknown)'}, not the teacher's last layers in order; "
                               f"use --hidden-weight 0 or a model converted from this teacher with --layer-map partition")
    return src


def predicting_states(states, idx, prefix_length: int):
    """A token-decoder layer's output (B*N, p + L_B - 1, D) -> (B, T, D): the state at each original position's
    prediction slot (the layout `final_hidden` reads; `idx` from `prediction_slots`)."""
    s = states[:, prefix_length - 1:].unflatten(0, (idx.shape[0], -1)).flatten(1, 2)   # (B, N*L_B, D)
    return s.gather(1, idx[..., None].expand(-1, -1, s.shape[-1]))


def layerwise_state_loss(student_states, teacher_states, idx, valid, prefix_length: int):
    """Summed relative squared error, mean over layers, between each token-decoder layer's output and the teacher
    layer it came from, at every predicted position.

    student_states: per layer (B*N, p + L_B - 1, D); slot p - 1 onward predict the block's tokens, as in
    `final_hidden`, and `idx` (B, T) maps original position t to its slot in the flattened (B, N*L_B) layout.
    teacher_states: per layer (B, T, D). valid (B, T) bool: positions that predict a label. The error is relative
    (|s - t|^2 / |t|^2) because residual norms differ by orders of magnitude between positions (attention sinks).
    """
    total = None
    for s, t in zip(student_states, teacher_states):
        s, t = predicting_states(s, idx, prefix_length)[valid].float(), t[valid].float()  # (n, D) each
        err = ((s - t) ** 2).sum(-1) / (t ** 2).sum(-1).clamp(min=1e-6)
        total = err.sum() if total is None else total + err.sum()
    return total / len(student_states)


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


@dataclass
class Guide:
    """The teacher and the hooks its extra losses read: the state at the split (--align-weight), and the outputs
    of the teacher's upper layers beside those of the student's token-decoder layers copied from them
    (--hidden-weight). `close` removes every hook, so the trained model leaves with none."""
    model: object = None
    align: LayerTap | None = None
    upper: MultiTap | None = None
    student: MultiTap | None = None

    @classmethod
    def build(cls, cfg, model, teacher) -> "Guide":
        if teacher is None:
            return cls()
        align = LayerTap(teacher, teacher_align_layer(model.config, teacher)) if cfg.align_weight else None
        upper = student = None
        if cfg.hidden_weight:
            layers = teacher.get_submodule(family_for(teacher.config.model_type).layers)
            upper = MultiTap([layers[i] for i in teacher_token_layers(model.config, teacher)])
            student = MultiTap(list(model.token_decoder.layers))
        return cls(teacher, align, upper, student)

    def close(self) -> None:
        for tap in (self.align.taps if self.align else None, self.upper, self.student):
            for h in tap.handles if tap else ():
                h.remove()
