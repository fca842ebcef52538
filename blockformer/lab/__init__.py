"""The recovery lab (issue 11 §1): pretrain a tiny Llama, convert it, and compare ways of uptraining it against a
Block Transformer of the same shape trained from scratch. Run it with `python bench/recovery_lab.py`."""
from .config import LabConfig, preset
from .run import run_lab

__all__ = ["LabConfig", "preset", "run_lab"]
