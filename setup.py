"""Build hook: the wheel carries what the package needs besides its modules (orchestrator/resources.py).

``sql/`` (install scripts and the C sources, compiled at ``up`` against the bundled PostgreSQL),
``patroni/``, ``migrations/``, ``alembic.ini`` and ``samples/`` are copied into
``orchestrator/_data`` of the build. An editable install keeps reading them from the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DATA = ("sql", "patroni", "migrations", "samples", "alembic.ini")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.so", "*.bc")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "orchestrator" / "_data"
        for name in DATA:
            source, dest = HERE / name, target / name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, ignore=SKIP)
            else:
                shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildPyWithData})
