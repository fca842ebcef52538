"""Registers blockformer's lm-eval model when lm-eval loads its model table; run from a .pth line at start-up.

Standard library only, and it imports nothing until `lm_eval.models` is imported, so start-up stays cheap.
This is what lets an unpatched `lm_eval --model blockformer ...` find the model.
"""
import importlib.abc
import importlib.util
import sys


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            try:
                import blockformer.eval.lm_eval_plugin  # noqa: F401 - registers "blockformer"
            except Exception as e:  # never break lm-eval because of the plugin
                print(f"blockformer: lm-eval plugin not registered ({e})", file=sys.stderr)

        spec.loader.exec_module = run
        return spec


def install():
    if not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())
