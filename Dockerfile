# replkv: one image for the nodes (replnode), the router (replrouter) and the client (replctl).
#
#   docker compose up -d --build                  # the four-node cluster and the router
#   DOCKER_BUILDKIT=0 docker build --rm --force-rm -t replkv .   # the image alone
#
# The image is built from this source tree (`pip install .`), never from PyPI. Where the build
# context holds .wheelhouse/ (`scripts/docker_engine.sh wheelhouse` makes it: wheels of replkv
# and its dependencies for the base image's Python), it installs from those wheels alone, with
# no network; without it, pip fetches the dependencies (msgpack, click) from the index.
#
# BASE_IMAGE may be any Debian-like image with python3 (>= 3.11) and its venv module; on a
# machine with no registry, `scripts/docker_engine.sh base-image` builds local/base:latest from
# Debian packages (see docs/DOCKER.md).
#
# One stage on purpose: a multi-stage build leaves its build stage behind as an untagged
# (dangling) image after every build. Every image and build container of this Dockerfile
# carries the label org.opencontainers.image.title=replkv, so what an interrupted or failed
# build, or an older build of the same tag, leaves is removed by
#   docker image prune -f --filter label=org.opencontainers.image.title=replkv
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="replkv" \
      org.opencontainers.image.description="A replicated key-value store: replnode, replrouter, replctl"
RUN groupadd --system --gid 10001 replkv \
    && useradd --system --uid 10001 --gid replkv --home-dir /data --no-create-home \
               --shell /usr/sbin/nologin replkv \
    && mkdir -p /data \
    && chown replkv:replkv /data
# .dockerignore lets in only pyproject.toml, README.md, cluster/ and .wheelhouse/. The source
# stays in the COPY layer (a few hundred kB); the venv is made, filled and stripped of pip in
# one RUN, so that no layer keeps pip or a build's leftovers.
COPY . /tmp/replkv-src
RUN set -e; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore; \
    python3 -m venv /opt/replkv; \
    cd /tmp/replkv-src; \
    if ls .wheelhouse/*.whl >/dev/null 2>&1; then \
        /opt/replkv/bin/pip install --no-index --find-links .wheelhouse .; \
    else \
        /opt/replkv/bin/pip install .; \
    fi; \
    cd /; \
    rm -rf /tmp/replkv-src; \
    /opt/replkv/bin/pip uninstall -y -q pip setuptools 2>/dev/null || true; \
    /opt/replkv/bin/replctl --help >/dev/null
ENV PATH=/opt/replkv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REPL_DATA_DIR=/data
USER replkv
WORKDIR /data
CMD ["replctl", "--help"]
