"""Explainer registry: ``explainer.name`` -> (Settings, Explainer) class, imported lazily."""

from __future__ import annotations

import difflib
import importlib

from explain_cli.errors import ConfigError

# name -> module; each module defines ``Settings`` and ``Explainer``.
_MODULES = {
    "gradient": "explain_cli.explainers.gradient",
    "deep": "explain_cli.explainers.deep",
    "partition": "explain_cli.explainers.partition",
    "kernel": "explain_cli.explainers.kernel",
    "amortized": "explain_cli.explainers.amortized",
}


def register(name: str, module: str) -> None:
    """Make ``explainer.name: NAME`` load ``module`` (which defines ``Settings`` and ``Explainer``):
    how a new explainer joins (docs/explainers.md, "Adding an explainer")."""
    _MODULES[name] = module


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str):
    """The explainer module for ``name``; ConfigError (with the nearest valid name) otherwise."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError("explainer.name", f"unknown explainer '{name}'{hint}; valid: {', '.join(names())}")
    return importlib.import_module(_MODULES[name])
