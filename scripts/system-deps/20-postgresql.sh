#!/usr/bin/env bash
# PostgreSQL server binaries for the shared-gallery tests (tests/test_postgres*.py,
# tests/test_scaleout.py); the tests start their own throwaway cluster, nothing system-wide.
# Present: nothing to do. Root with apt: install from the Debian mirror. Otherwise: say how.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be empty in a fresh container; fetch them only then.
    if ! apt-cache show postgresql >/dev/null 2>&1; then
        apt-get update -qq
    fi
    apt-get install -y -qq postgresql >/dev/null
    echo "system-deps: installed $(ls -d /usr/lib/postgresql/*/bin/postgres | tail -1)"
    exit 0
fi
echo "system-deps: no PostgreSQL server; the PostgreSQL gallery tests will skip." \
     "Install it with: sudo apt-get install postgresql"
exit 0
