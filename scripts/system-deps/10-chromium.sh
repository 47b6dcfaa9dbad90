#!/usr/bin/env bash
# Headless Chromium and its driver for the operator-console browser tests (tests/test_console*.py).
# Present: nothing to do. Root with apt: install from the Debian mirror. Otherwise: say how.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be empty in a fresh container; fetch them only then, or when
    # they are stale (the install fails on versions the mirror no longer has).
    if ! apt-cache show chromium >/dev/null 2>&1; then
        apt-get update -qq
    fi
    apt-get install -y -qq chromium chromium-driver >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }
    echo "system-deps: installed chromium $(/usr/bin/chromium --version 2>/dev/null || true)"
    exit 0
fi
echo "system-deps: no Chromium; the browser tests will skip." \
     "Install it with: sudo apt-get install chromium chromium-driver"
exit 0
