"""Build hook: a wheel carries a copy of pyproject.toml as xmfl/pyproject.toml.

``flwr run`` needs the app's ``pyproject.toml`` (``[tool.flwr.app]``, with the
run config defaults) beside its packages, and a wheel installs only packages.
The copy is made here, at build time, from the one hand-written file, so the
two cannot drift; an editable install reads the checkout's file instead (see
``xmfl/app.py``). Everything else about the package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

APP_FILE = Path("xmfl", "pyproject.toml")


class BuildPyWithAppFile(build_py):
    """``build_py`` that also copies pyproject.toml into the built ``xmfl`` package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib, APP_FILE)
            self.mkpath(str(target.parent))
            self.copy_file("pyproject.toml", str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib, APP_FILE))]


setup(cmdclass={"build_py": BuildPyWithAppFile})
