"""`blockformer eval`: zero-shot tasks with lm-eval 0.4's prompts and metrics, a model alone or against a baseline."""
from .harness import EvalConfig, evaluate
from .scoring import Scorer

__all__ = ["EvalConfig", "evaluate", "Scorer"]
