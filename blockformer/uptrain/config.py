"""The options of `blockformer uptrain`, written once, and their checks (shared by the CLI and YAML recipes)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BlockformerError

# Parts of a Block Transformer that --freeze can name (a dotted sub-part such as embedder.proj works too).
FREEZE_PARTS = ("embedder", "block_decoder", "token_decoder")
PRECISIONS = ("auto", "bf16", "fp32")
SYNTH_KINDS = ("article", "story", "howto")  # kinds of teacher-written text (synth.py)


@dataclass
class UptrainConfig:
    model: str
    data: str | tuple[str, ...]     # one source, or several whose documents are pooled (data_specs)
    out: Path
    teacher: str | None = None
    kd_weight: float = 0.5          # with a teacher: loss = (1 - w) CE + w KD
    temperature: float = 1.0
    align_weight: float = 0.0
    text_field: str = "text"
    split: str = "train"
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None   # seconds
    lora_rank: int = 0              # 0: full fine-tuning
    lora_alpha: int = 16
    freeze: tuple[str, ...] = ()
    precision: str = "auto"         # auto | bf16 | fp32
    eval_every: int = 50
    val_fraction: float = 0.05
    val_rows: int = 32              # validation rows scored each time (a fixed subset of the held-out slice)
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    max_docs: int | None = None     # documents read at most (streamed datasets stop there)
    hidden_weight: float = 0.0      # layer-wise distillation of the token decoder's states (per predicted token)
    block_start_weight: float = 1.0  # loss weight of the predictions of each block's first token (others 1, renormed)

    def check(self) -> None:
        """Raise BlockformerError naming the first bad option as `field (--flag)`; no I/O, so recipes can call it."""
        at_least(self, 1, "seq_len", "batch_size", "grad_accum", "save_every", "eval_every", "keep_last", "val_rows",
                 "max_steps", "max_tokens", "max_docs", "lora_alpha")
        at_least(self, 0, "warmup_steps", "lora_rank")
        positive(self, "lr", "temperature", "max_time", "block_start_weight")
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise BlockformerError("set a budget: --max-steps, --max-tokens or --max-time")
        between(self, "kd_weight", 0, 1)
        between(self, "min_lr_ratio", 0, 1)
        non_negative(self, "align_weight", "hidden_weight", "weight_decay", "grad_clip")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise BlockformerError(f"val_fraction must be between 0 and 1, exclusive (got {self.val_fraction!r})")
        if self.precision not in PRECISIONS:
            raise BlockformerError(f"precision (--precision) must be one of {', '.join(PRECISIONS)} "
                                   f"(got {self.precision!r})")
        check_freeze(self.freeze)
        data_specs(self.data)
        if self.align_weight and not self.teacher:
            raise BlockformerError("align_weight (--align-weight) needs a teacher (--teacher): it aligns the block "
                                   "decoder with the teacher's hidden states")
        if self.hidden_weight and not self.teacher:
            raise BlockformerError("hidden_weight (--hidden-weight) needs a teacher (--teacher): it matches the token "
                                   "decoder's layers to the teacher's")


def data_specs(data) -> list[str]:
    """The training sources: `data` as one name or a list of them (their documents are pooled, then packed)."""
    specs = [data] if isinstance(data, str) else list(data) if isinstance(data, (list, tuple)) else None
    if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
        raise BlockformerError(f"data (--data) must name a file, folder or dataset, or a list of them (got {data!r})")
    return specs


def step_budget(max_steps: int | None, max_tokens: int | None, tokens_per_step: int) -> int | None:
    """Optimizer steps the budget allows: the first of max_steps and max_tokens reached; None for time only."""
    budgets = [b for b in (max_steps, math.ceil(max_tokens / tokens_per_step) if max_tokens else None) if b]
    return min(budgets) if budgets else None


def flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _number(cfg, name: str, kinds=(int, float)):
    v = getattr(cfg, name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an integer" if kinds == (int,) else "a finite number"
        raise BlockformerError(f"{flag(name)} must be {kind} (got {v!r})")
    return v


def at_least(cfg, low: int, *names: str) -> None:
    for name in names:
        v = _number(cfg, name, (int,))
        if v is not None and v < low:
            raise BlockformerError(f"{flag(name)} must be >= {low} (got {v})")


def positive(cfg, *names: str) -> None:
    for name in names:
        v = _number(cfg, name)
        if v is not None and v <= 0:
            raise BlockformerError(f"{flag(name)} must be > 0 (got {v})")


def non_negative(cfg, *names: str) -> None:
    for name in names:
        v = _number(cfg, name)
        if v is not None and v < 0:
            raise BlockformerError(f"{flag(name)} must be >= 0 (got {v})")


def between(cfg, name: str, low: float, high: float) -> None:
    v = _number(cfg, name)
    if v is not None and not low <= v <= high:
        raise BlockformerError(f"{flag(name)} must be between {low} and {high} (got {v})")


def check_freeze(freeze) -> None:
    if isinstance(freeze, str) or not isinstance(freeze, (list, tuple)) or \
            not all(isinstance(p, str) for p in freeze):
        raise BlockformerError(f"freeze (--freeze) must be a list of part names such as {', '.join(FREEZE_PARTS)} "
                               f"(got {freeze!r})")
    for part in freeze:
        if part.split(".")[0] not in FREEZE_PARTS:
            raise BlockformerError(f"freeze (--freeze): unknown part '{part}' (known: {', '.join(FREEZE_PARTS)})")


@dataclass
class SynthConfig:
    """The options of `blockformer synth` (uptrain/synth.py)."""
    source: str
    out: Path
    tokens: int = 65536             # stop once this many tokens are written
    kinds: tuple[str, ...] = ("article", "story", "howto")
    batch_size: int = 16            # prompts generated together
    max_new_tokens: int = 320       # longest document
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        unknown = [k for k in self.kinds if k not in SYNTH_KINDS]
        if unknown or not self.kinds:
            raise BlockformerError(f"kinds (--kinds) must be among {', '.join(SYNTH_KINDS)} (got {', '.join(unknown)})")
        for name in ("tokens", "batch_size", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BlockformerError(f"{name} (--{name.replace('_', '-')}) must be a positive integer")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise BlockformerError("--temperature must be > 0 and --top-p in (0, 1]")
        if Path(self.out).suffix != ".jsonl":  # uptrain reads a file by its suffix: .txt would train on raw JSON
            raise BlockformerError(f"--out {self.out}: the teacher's text is written as JSON lines; name it *.jsonl")
        if Path(self.out).exists() and not self.overwrite:
            raise BlockformerError(f"{self.out} already exists; pass --overwrite to replace it")
