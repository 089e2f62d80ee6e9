#!/usr/bin/env bash
# Dashboard browser test: a real coordinator runs two rounds, headless
# chromium loads the dashboard, and the test checks the round, the SVG chart,
# the agents and the console. Needs `chromium` (apt-get install -y chromium);
# without it the test prints a notice and passes vacuously, so this script
# refuses to run without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    echo "chromium is not installed: apt-get update && apt-get install -y chromium" >&2
    exit 1
fi
cargo test -p fedcart-tests --test e2e dashboard -- --nocapture
