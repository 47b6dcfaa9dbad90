#!/usr/bin/env bash
# Produces the curl examples of README.md: a real server on 127.0.0.1 with the default
# model and a fresh gallery, real CelebA photos. Usage: bash docs/examples.sh (needs jq)
set -euo pipefail
cd "$(dirname "$0")/.."
P=../shared/data/celeba-subset/images
PORT=${PORT:-8123}
GALLERY=$(mktemp -d)/gallery.sqlite
FACEGATE_GALLERY=$GALLERY .venv/bin/facegate serve --bundle models/default --port "$PORT" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.5; done
cd "$P/.."  # so the commands below show short photo paths
run() { echo "\$ $1"; bash -c "$1"; echo; }
U=http://127.0.0.1:$PORT
run "curl -s $U/readyz | jq -c"
run "curl -s -F image1=@images/7202/006155.jpg -F image2=@images/7202/008450.jpg $U/v1/verify | jq -c '{match, similarity, threshold, threshold_source, estimated_far, faces: [.faces[].faces_in_image], timings_ms}'"
run "curl -s -F image1=@images/7202/006155.jpg -F image2=@images/7203/$(ls images/7203 | head -1) $U/v1/verify | jq -c '{match, similarity, threshold}'"
run "curl -s -F identity_id=7202 -F name='Person 7202' -F images=@images/7202/006155.jpg -F images=@images/7202/008450.jpg $U/v1/identities | jq -c '{identity_id: .identity.identity_id, images: [.images[] | {accepted, template_id}], templates, threshold}'"
run "curl -s -F image=@images/7202/012050.jpg -F k=3 $U/v1/search | jq -c '{match: .match.identity_id, threshold, target_fpir, estimated_fpir, gallery, candidates}'"
run "curl -s -F image=@images/7203/$(ls images/7203 | head -1) -F k=3 $U/v1/search | jq -c '{match, threshold, estimated_fpir, candidates}'"
run "curl -s -F image=@images/7202/012050.jpg -F identity_id=7202 $U/v1/verify/identity | jq -c '{match, similarity, templates, threshold, target_far, estimated_far}'"
run "curl -s -F image1=@/etc/hostname -F image2=@images/7202/006155.jpg $U/v1/verify | jq -c"
run "curl -s $U/metrics | grep -E '^facegate_(decisions_total|threshold)'"
