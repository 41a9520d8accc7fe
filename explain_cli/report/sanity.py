"""The Sanity check section: what ``explain-cli check`` left in the run folder's ``check/``."""

from __future__ import annotations

from pathlib import Path


def _check_html(output_dir: Path) -> str:
    return ""
