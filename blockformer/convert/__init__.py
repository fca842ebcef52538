"""`blockformer convert`: a Hugging Face decoder-only checkpoint in, a Block Transformer folder out."""
from .convert import ConvertConfig, convert, plan_layers

__all__ = ["ConvertConfig", "convert", "plan_layers"]
