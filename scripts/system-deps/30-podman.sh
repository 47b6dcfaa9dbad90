#!/usr/bin/env bash
# A container engine for the image tests (tests/test_container_image.py): podman with runc,
# podman-compose for deploy/compose.yaml, and mmdebstrap to make a Debian base image where
# no container registry is reachable (scripts/container-base.sh). Present: only the settings below. Root with apt: install
# from the Debian mirror. Otherwise: say how. A host with a working docker needs none of it.
set -euo pipefail

if ! { command -v podman && command -v runc && command -v podman-compose && command -v mmdebstrap; } >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "system-deps: no podman; the container image tests will skip." \
             "Install it with: sudo apt-get install podman runc podman-compose mmdebstrap"
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show podman >/dev/null 2>&1; then
        apt-get update -qq
    fi
    apt-get install -y -qq podman runc podman-compose mmdebstrap >/dev/null
    echo "system-deps: installed $(podman --version)"
fi

# Settings for hosts like CI's, measured there: crun (podman's first choice) refuses a
# cgroup v1 hybrid layout, runc works; podman's default container limits (nofile 1048576)
# exceed this host's hard limits and a process without CAP_SYS_RESOURCE cannot raise
# them, so every container failed to start ("error setting rlimit"). nproc above 32768
# failed the same way (podman itself runs under 32768 there).
[ "$(id -u)" = 0 ] || exit 0
conf=/etc/containers/containers.conf.d/50-facegate.conf
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ] && nofile=1048576
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
want=$(printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\n' \
    "$nofile" "$nofile" "$nproc" "$nproc")
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" > "$conf"
    echo "system-deps: wrote $conf (runc; nofile $nofile, nproc $nproc)"
fi
