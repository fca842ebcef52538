"""`blockformer eval`: zero-shot tasks with lm-eval 0.4's prompts and metrics, original vs converted."""
from .harness import EvalConfig, evaluate
from .scoring import Scorer

__all__ = ["EvalConfig", "evaluate", "Scorer"]
