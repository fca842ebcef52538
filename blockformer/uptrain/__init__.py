"""`blockformer uptrain`: win back the original's quality with a short CE / distillation run, full or LoRA."""
from .train import UptrainConfig, uptrain

__all__ = ["UptrainConfig", "uptrain"]
