"""The whole job from one recipe: convert -> uptrain -> eval -> bench -> report."""
from .recipe import Recipe, load_recipe
from .run import RunConfig, run

__all__ = ["Recipe", "RunConfig", "load_recipe", "run"]
