"""Optional dependencies: each belongs to one extra of pyproject.toml, and a missing one
is one line that names the extra to install (never an ImportError traceback)."""

from __future__ import annotations

import importlib

# import name -> the extra of `pip install "medalign[EXTRA]"` that brings it
EXTRAS = {"bitsandbytes": "quant", "tensorboard": "tensorboard", "wandb": "wandb"}


class MissingExtra(ValueError):
    """An optional package a requested feature needs is not installed."""


def require(module: str, feature: str):
    """Import `module` (a key of EXTRAS) or raise MissingExtra naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module.split(".")[0]]
        raise MissingExtra(f"{feature} needs the {module.split('.')[0]} package, which is not installed "
                           f"({e}): pip install \"medalign[{extra}]\"") from e
