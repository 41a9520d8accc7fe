"""explain-cli: batch SHAP explanations for PyTorch image classifiers.

From Python (docs/python-api.md)::

    import explain_cli, shap
    expl = explain_cli.explain("configs/demo.yaml")          # a shap.Explanation, nothing written
    shap.image_plot(expl)
    result = explain_cli.run("configs/demo.yaml")            # the batch job, as `explain-cli run`
    expl = explain_cli.load_run(result.output_dir)           # a run's values/*.npz, read back

The API lives in ``explain_cli.api`` and is imported on first use, so ``import explain_cli`` (and
the CLI's ``--help``) loads neither torch nor shap.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("explain", "load_run", "iter_run", "run", "load_config", "clear_cache", "RunResult")
_ERRORS = ("ConfigError", "UserError", "ImageError")
__all__ = ["__version__", *_API, *_ERRORS]
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (a few ms)

if TYPE_CHECKING:
    from explain_cli.api import RunResult, clear_cache, explain, iter_run, load_config, load_run, run
    from explain_cli.errors import ConfigError, ImageError, UserError


def __getattr__(name: str) -> object:
    """The public API, imported on first access (PEP 562)."""
    if name in _API:
        from explain_cli import api

        return getattr(api, name)
    if name in _ERRORS:
        from explain_cli import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'explain_cli' has no attribute {name!r}")
