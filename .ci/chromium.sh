#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser tests (Playwright drives it; Playwright's
# own browser download cannot run here): install it if it is missing.
set -euo pipefail
command -v /usr/bin/chromium >/dev/null 2>&1 && exit 0
echo "Chromium is not installed: installing it from Debian's packages" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
