#!/usr/bin/env bash
# Build the stand-ins for postgres:15 and nginx (compose.local.yaml) on the local base.
set -euo pipefail
cd "$(dirname "$0")"
engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
ENGINE=$engine bash ../../scripts/container-base.sh
format=(); [ "$engine" != podman ] || format=(--format docker)  # keeps STOPSIGNAL, HEALTHCHECK
for kind in postgres nginx; do
    tag=localhost/facegate-$kind:$([ $kind = postgres ] && echo 15 || echo 1.22)
    # shellcheck disable=SC2086 # BUILD_FLAGS is a list of flags
    "$engine" build ${BUILD_FLAGS:-} "${format[@]}" -q -f $kind.Dockerfile -t "$tag" . >/dev/null
    echo "local: built $tag"
done
