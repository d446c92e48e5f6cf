"""Where the files the package needs besides its Python modules live: the extension's SQL and C
sources (``sql``), the Patroni template (``patroni``), the alembic migrations (``migrations``,
``alembic.ini``) and the bundled sample (``samples``).

Why one module: a wheel carries them as package data under ``orchestrator/_data`` (setup.py copies
them there at build time) while a checkout or an editable install keeps them at the top of the
repository, where the other engineers edit them. Every reader asks here, so both layouts work.
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path
from typing import Literal

from orchestrator.exceptions import ConfigError

Resource = Literal["sql", "patroni", "migrations", "samples", "alembic.ini"]
RESOURCES: tuple[Resource, ...] = ("sql", "patroni", "migrations", "samples", "alembic.ini")
PACKAGED = "_data"
CHECKOUT = Path(__file__).resolve().parent.parent


@cache
def path(name: Resource) -> Path:
    """The file or directory ``name``: packaged in the wheel, else in the checkout."""
    packaged = Path(str(importlib.resources.files("orchestrator"))) / PACKAGED / name
    if packaged.exists():
        return packaged
    checkout = CHECKOUT / name
    if checkout.exists():
        return checkout
    raise ConfigError(f"{name} is neither packaged ({packaged}) nor in a checkout ({checkout}): reinstall BuildSmartDB")
