"""`blockformer uptrain`: win back the original's quality with a short CE / distillation run, full or LoRA."""
from .config import UptrainConfig
from .train import uptrain

__all__ = ["UptrainConfig", "uptrain"]
