#!/usr/bin/env bash
# Build facegate's container image with podman or docker (docs/deploy.md).
#   scripts/image.sh cpu|gpu [TAG]          (make image, make image-gpu)
# BASE=python:3.11-slim (the Dockerfiles' default, from a registry) or a local base:
# BASE=local makes or reuses localhost/facegate-base:bookworm from Debian's packages
# (scripts/container-base.sh), for hosts that reach no container registry.
# ENGINE=podman|docker (default: podman where installed). BUILD_FLAGS: extra flags
# (--no-cache, say). pip reaches its index inside the build as it does on this host:
# the host's index URL and CA bundle go in as build secrets, never into a layer.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:?usage: scripts/image.sh cpu|gpu [TAG]}
case $kind in
    cpu) dockerfile=Dockerfile.cpu ;;
    gpu) dockerfile=Dockerfile ;;
    *) echo "image: kind is cpu or gpu, not $kind" >&2; exit 2 ;;
esac
tag=${2:-facegate:$kind}
engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
base=${BASE:-}
if [ "$base" = local ]; then
    base=localhost/facegate-base:bookworm
    ENGINE=$engine bash scripts/container-base.sh "$base"
fi

secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
pipcfg() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
ca=${PIP_CERT:-$(pipcfg cert)}
[ -n "$ca" ] || ca=$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile or "")')
[ -f "$ca" ] || ca=
index=${PIP_INDEX_URL:-$(pipcfg index-url)}
extra=${PIP_EXTRA_INDEX_URL:-$(pipcfg extra-index-url)}
{
    echo "[global]"
    # file:// indexes and find-links of the host are not inside the build: leave them out.
    case $index in http*) echo "index-url = $index" ;; esac
    extra=$(printf '%s\n' $extra | grep '^http' | tr '\n' ' ' || true)
    [ -z "$extra" ] || echo "extra-index-url = $extra"
    [ -z "$ca" ] || echo "cert = /run/secrets/ca.crt"
} > "$secrets/pip.conf"
args=(--secret "id=pip.conf,src=$secrets/pip.conf")
[ -z "$ca" ] || args+=(--secret "id=ca.crt,src=$ca")
[ -z "$base" ] || args+=(--build-arg "BASE=$base")
# podman's default (OCI) image format has no HEALTHCHECK; docker's keeps it.
[ "$engine" != podman ] || args+=(--format docker)

start=$(date +%s)
# shellcheck disable=SC2086 # BUILD_FLAGS is a list of flags
"$engine" build ${BUILD_FLAGS:-} "${args[@]}" -f "$dockerfile" -t "$tag" .
echo "image: built $tag from ${base:-its default base} in $(( $(date +%s) - start )) s," \
     "$("$engine" image inspect --format '{{.Size}}' "$tag") bytes"
