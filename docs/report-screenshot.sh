#!/usr/bin/env bash
# Re-take docs/report.png: scripts/figures.py draws every committed figure that shows a run (the demo run
# with metrics, its report.html photographed by headless Chromium at /usr/bin/chromium) and stamps it with
# a hash of its drawing code, which tests/test_figures.py checks. HEIGHT: window height in px (980).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/figures.py report
