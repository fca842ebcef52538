"""blockformer: turn a pretrained decoder-only LM into a Block Transformer, uptrain, evaluate, benchmark.

Importing the package registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads a converted folder without `trust_remote_code`.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .model import BlockTransformerConfig, BlockTransformerForCausalLM

AutoConfig.register(BlockTransformerConfig.model_type, BlockTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(BlockTransformerConfig, BlockTransformerForCausalLM, exist_ok=True)

__all__ = ["BlockTransformerConfig", "BlockTransformerForCausalLM"]
__version__ = "0.1.0"
