#!/usr/bin/env bash
# A Debian 12 base image with Python 3.11 for Dockerfile.cpu and Dockerfile, made locally
# with mmdebstrap from Debian's own packages: for hosts that reach Debian's mirror but no
# container registry. Where a registry is reachable the Dockerfiles' default bases
# (python:3.11-slim, debian:12-slim) serve instead.
#   scripts/container-base.sh [TAG]    (default localhost/facegate-base:bookworm)
#   ENGINE=docker scripts/container-base.sh
# Present already: nothing to do (FORCE=1 rebuilds). Needs root and mmdebstrap.
set -euo pipefail

tag=${1:-localhost/facegate-base:bookworm}
engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}

if [ "${FORCE:-0}" != 1 ] && "$engine" image inspect "$tag" >/dev/null 2>&1; then
    echo "container-base: $tag present"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "container-base: needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }

# minbase (dpkg, apt, coreutils) + the interpreter; no documentation, manual pages or
# translations, no apt package lists left behind. The Dockerfiles make their own venv.
mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm - \
  | "$engine" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$tag" >/dev/null
echo "container-base: made $tag ($("$engine" image inspect --format '{{.Size}}' "$tag") bytes)"
