#!/usr/bin/env bash
# Re-take docs/report.png: run the demo, then photograph out/demo/report.html in headless Chromium
# (Debian's chromium package). Extra arguments go to `explain-cli run`. HEIGHT: window height in px.
set -euo pipefail
cd "$(dirname "$0")/.."
explain-cli run configs/demo.yaml --overwrite --no-progress "$@"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
/usr/bin/chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size="1280,${HEIGHT:-860}" --screenshot="$PWD/docs/report.png" "file://$PWD/out/demo/report.html" 2>/dev/null
echo "wrote docs/report.png"
