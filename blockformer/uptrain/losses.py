"""Uptraining objectives: cross-entropy, distillation from the original, block-decoder alignment.

The vocabulary projection is applied in chunks of positions under activation checkpointing, so neither the
student's nor the teacher's (positions x vocabulary) logits are ever held whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(h, target, t_logits, head, temperature: float, kd_weight: float):
    """Summed loss of one chunk: (1 - w) * CE + w * T^2 * KL(teacher || student) at temperature T."""
    logits = head(h).float()
    loss = (1 - kd_weight) * F.cross_entropy(logits, target, reduction="sum") if kd_weight < 1 else logits.sum() * 0
    if t_logits is not None and kd_weight > 0:
        s = F.log_softmax(logits / temperature, -1)
        t = F.log_softmax(t_logits.float() / temperature, -1)
        kl = (t.exp() * (t - s)).sum()
        loss = loss + kd_weight * temperature ** 2 * kl
    return loss


def token_loss(h, labels, head, teacher=None, temperature=1.0, kd_weight=0.0, chunk=512):
    """Summed loss over the predicted positions and their count; `teacher` = (hidden (B, T, D), head) or None.

    Position t of `h` predicts `labels[:, t + 1]`.
    """
    valid = labels[:, 1:] != -100
    hs, target = h[:, :-1][valid], labels[:, 1:][valid]                          # (n, D), (n,)
    th = teacher[0][:, :-1][valid] if teacher is not None else None
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, hs.shape[0], chunk):
        t_logits = None
        if th is not None:
            with torch.no_grad():
                t_logits = teacher[1](th[i:i + chunk])
        total = total + checkpoint(_chunk_loss, hs[i:i + chunk], target[i:i + chunk], t_logits, head,
                                   temperature, kd_weight, use_reentrant=False)
    return total, int(valid.sum())


def alignment_loss(ctx, shift, teacher_hidden, mask, block_length: int):
    """MSE between the block decoder's output for each block and the original's hidden state, at the split layer,
    at the token that closes that block (both live in the same residual stream)."""
    B, N, _ = ctx.shape
    L, T = block_length, teacher_hidden.shape[1]
    pos = torch.arange(N, device=ctx.device) * L + L - 1 - shift[:, None]       # (B, N) original positions
    ok = (pos >= 0) & (pos < T)
    pos = pos.clamp(0, T - 1)
    ok &= mask.gather(1, pos)
    target = teacher_hidden.gather(1, pos[..., None].expand(-1, -1, ctx.shape[-1]))
    err = ((ctx.float() - target.float()) ** 2).mean(-1)
    return (err * ok).sum(), int(ok.sum())
