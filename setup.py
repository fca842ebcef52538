"""Only here to ship `blockformer-lm-eval.pth` (registers the lm-eval model at start-up); the rest is pyproject."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file("blockformer-lm-eval.pth", os.path.join(self.build_lib, "blockformer-lm-eval.pth"))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, "blockformer-lm-eval.pth")]


setup(cmdclass={"build_py": BuildPyWithPth})
