"""The lab's options, written once, with three presets sized for 2 CPU cores (docs/recovery-lab.md).

`full` pretrains a ~5.7M-parameter model for N tokens (about an hour of vanilla pretraining); `quick` runs the
whole lab in under ten minutes; `micro` is the test's end-to-end run (seconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BlockformerError
from .methods import METHODS as _ALL

METHODS = tuple(_ALL)  # every method, in the table's order


@dataclass
class LabConfig:
    out: Path
    # the vanilla model (Llama-style) and its tokenizer
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 688
    # data: the bundled books, split into chunks; the tail of every book is validation text, never trained on
    data: str = "corpus/gutenberg"
    max_chars: int | None = None     # read at most this many characters (micro runs)
    val_share: float = 0.02          # share of every book (its end) held out for validation
    val_rows: int = 128              # validation rows of seq_len tokens, the same for every model
    chunk_chars: int = 4000          # training documents: chunks of the books (uptrain pads each one's front)
    seq_len: int = 256
    batch_size: int = 8
    # pretraining (vanilla and from-scratch block): AdamW, warm-up then cosine
    tokens: int = 8_000_000          # N: about an hour of vanilla pretraining on 2 cores (docs/recovery-lab.md)
    lr: float = 1.5e-3
    curve_points: int = 12           # validation evaluations along each pretraining run
    # conversion and uptraining
    block_length: int = 4
    prefix_length: int = 2
    budgets: tuple[float, ...] = (0.01, 0.03, 0.10)
    methods: tuple[str, ...] = METHODS
    uptrain_lr: float = 7.5e-4
    kd_weight: float = 0.5
    align_weight: float = 0.5
    lora_rank: int = 16
    staged_share: float = 0.25       # staged schedules: share of the budget with the decoder layers frozen
    calib_tokens: int = 65536        # contextual init
    seeds: int = 2                   # seeds at the smallest budget
    seed: int = 0
    threads: int | None = None       # torch threads; None: the cores not already busy (at least one)

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_len", "batch_size", "tokens",
                     "val_rows", "curve_points", "block_length", "prefix_length", "seeds", "chunk_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BlockformerError(f"{name} must be an integer >= 1 (got {v!r})")
        if self.num_layers < 2:
            raise BlockformerError(f"num_layers must be >= 2: the block and token decoders need one each "
                                   f"(got {self.num_layers})")
        if self.hidden_size % self.num_heads:
            raise BlockformerError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.seq_len % self.block_length:
            raise BlockformerError(f"seq_len {self.seq_len} is not a multiple of block_length {self.block_length}")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise BlockformerError(f"budgets must be shares of N in (0, 1] (got {self.budgets!r})")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise BlockformerError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: "
                                   f"{', '.join(METHODS)}")
        ends = [m for m in self.methods if _ALL[m].progressive and _ALL[m].progressive[-1] != self.block_length]
        if ends:
            raise BlockformerError(f"{', '.join(ends)} must end at the lab's block length {self.block_length}")
        short = [m for m in self.methods if len(_ALL[m].progressive) > self.budget_tokens(min(self.budgets)) //
                 self.step_tokens]
        if short:
            raise BlockformerError(f"{', '.join(short)}: a progressive method needs a step per block length; the "
                                   f"smallest budget has {self.budget_tokens(min(self.budgets)) // self.step_tokens}")
        if not 0 < self.val_share < 0.5 or not 0 < self.staged_share < 1:
            raise BlockformerError("val_share must be in (0, 0.5) and staged_share in (0, 1)")

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len

    def budget_tokens(self, share: float) -> int:
        """A budget as whole optimizer steps (at least one), so that every method sees exactly these tokens."""
        return max(1, math.ceil(share * self.tokens / self.step_tokens)) * self.step_tokens

    @property
    def pretrain_steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.step_tokens))


PRESETS = {
    "full": {},
    "quick": dict(vocab_size=2048, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=176, seq_len=128,
                  val_rows=64, tokens=1_000_000, lr=2e-3, uptrain_lr=1e-3, lora_rank=8, calib_tokens=16384),
    "micro": dict(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=32,
                  batch_size=4, max_chars=400_000, val_rows=8, tokens=4096, lr=3e-3, uptrain_lr=2e-3,
                  budgets=(0.05, 0.25), methods=("ce", "staged_kd"), lora_rank=4, calib_tokens=512,
                  curve_points=4, chunk_chars=2000),
}


def preset(name: str, out: Path, **overrides) -> LabConfig:
    if name not in PRESETS:
        raise BlockformerError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = replace(LabConfig(Path(out)), **PRESETS[name])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
