"""``report.html``: one self-contained page to browse a run's output folder.

Built only from what a run leaves in ``output.dir`` (``run.json`` or ``run.shard-*.json``,
``topk.csv`` or the shards' ``topk.shard-*.csv``, ``errors.csv``, ``overlays/``), so it works the
same at the end of a run, after ``merge`` and by ``explain-cli report OUTPUT_DIR``.

Why it looks the way it does:

* Nothing is loaded from the network: CSS and JS are inline, and a Content-Security-Policy
  allows only that one script (by its hash), inline styles and same-folder images. The CSS, the
  script and the page template are package data files beside this module (``page.css``,
  ``page.js``, ``page.html``), read once and inlined; the script's CSP hash is computed from
  ``page.js``'s bytes, so an edit of the file cannot leave the page with a stale hash.
* It stays responsive with thousands of images: the table is rendered by the script from an
  embedded JSON array, one page of rows at a time, and thumbnails are ``<img loading="lazy">``
  pointing at the overlay files (relative, percent-encoded URLs), never inlined SVGs.
* Class and file names are data, never markup: the summary is escaped with ``html.escape``,
  the embedded JSON escapes ``<``, ``>``, ``&`` and U+2028/2029 (so ``</script>`` in a label
  cannot end the script), and the script builds rows with ``textContent`` and DOM properties only.
* Optional columns and keys (``stability``, ``deletion_auc``, ``insertion_auc``, other numeric
  columns, ``metrics.random_reference`` in run.json) are shown when present and ignored when not.
* The page has no timestamp of its own: the same folder gives the same bytes.

The package does not import torch or numpy. Its parts: ``outputs`` (reading the folder), ``table``
(the image table's JSON), ``summary`` (cards, run details, failed images), ``slides`` (the Slides
section), ``sanity`` (the Sanity check section from ``check/``, written by ``explain-cli check``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
from importlib import resources
from pathlib import Path

from explain_cli import __version__
from explain_cli.report.outputs import (RunOutputs, _number, _read_csv, _read_json, _shard_files,  # noqa: F401
                                        load_outputs)
from explain_cli.report.sanity import _check_html
from explain_cli.report.slides import (SLIDE_CLASSES_SHOWN, _read_slides, _slide_card,  # noqa: F401
                                       _slide_class_html, _slide_file_url, _slides_html, _tile_link)
from explain_cli.report.summary import (_card, _e, _errors_html, _fmt_seconds, _kv_table,  # noqa: F401
                                        _random_reference, _status, _summary_html)
from explain_cli.report.table import (_columns, _list_overlays, _overlay_url, _script_json,  # noqa: F401
                                      _table_data)
from explain_cli.write import atomic_write_text

log = logging.getLogger("explain_cli")

REPORT_NAME = "report.html"

__all__ = ["REPORT_NAME", "SLIDE_CLASSES_SHOWN", "RunOutputs", "build_report", "load_outputs", "write_report",
           "write_report_or_warn"]


@functools.cache
def _asset(name: str) -> str:
    """A page file shipped with the package (page.css, page.js, page.html), as its exact text."""
    return resources.files(__name__).joinpath(name).read_bytes().decode("utf-8")


def build_report(output_dir: Path) -> str:
    """The page for ``output_dir`` as a string (UserError when it holds no run outputs)."""
    outputs = load_outputs(Path(output_dir))
    run = outputs.run or (outputs.shards[0][1] if outputs.shards else {})
    output_cfg = (run.get("config") or {}).get("output")  # run.json's config: a mapping (RunRecord), its sections as written
    fmt = str(output_cfg.get("format", "svg")) if isinstance(output_cfg, dict) else "svg"
    data = _table_data(outputs, fmt)
    data["reference"] = _random_reference(outputs)
    badge, tone = _status(outputs)
    name = Path(output_dir).resolve().name or str(output_dir)
    script = _asset("page.js")
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    return _asset("page.html").format(
        csp=_e(csp), title=_e(f"explain-cli report: {name}"), name=_e(name), version=_e(__version__),
        badge=_e(badge), tone=tone, summary=_summary_html(outputs, data["images"], data["columns"]),
        check=_check_html(outputs.output_dir), slides=_slides_html(outputs, data["images"]),
        errors=_errors_html(outputs), css=_asset("page.css"), data=_script_json(data), script=script,
    )


def write_report(output_dir: Path) -> Path:
    """Write ``output_dir/report.html`` atomically (left alone when unchanged); returns its path."""
    page = build_report(output_dir)
    path = Path(output_dir) / REPORT_NAME
    try:
        same = path.read_text(encoding="utf-8") == page
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        atomic_write_text(path, page)
    return path


def write_report_or_warn(output_dir: Path) -> Path | None:
    """write_report for the end of a run: a failure is a warning, never a failed run."""
    try:
        return write_report(output_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience; the run's outputs stand
        log.debug("report.html failed", exc_info=True)
        log.warning("could not write %s in %s: %s: %s", REPORT_NAME, output_dir, type(exc).__name__, exc)
        return None


