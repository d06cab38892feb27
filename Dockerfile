# replkv: one image for the nodes (replnode), the router (replrouter) and the client (replctl).
#
#   docker build -t replkv .                      # slim official Python, installs from PyPI
#   docker compose up -d --build                  # the four-node cluster and the router
#
# BASE_IMAGE may be any Debian-like image with python3 (>= 3.11) and its venv module; the test
# tier builds an offline one with debootstrap and passes --build-arg BASE_IMAGE=local/base:latest.
# A directory .wheelhouse/ in the build context, if present, holds wheels for replkv and its
# dependencies, and then the build installs from it alone, with no network (the test tier makes
# it with `pip wheel`/`pip download`); without it the build installs the source from PyPI.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/replkv
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, cluster/ and .wheelhouse/.
COPY . .
RUN set -e; \
    if ls .wheelhouse/*.whl >/dev/null 2>&1; then \
        /opt/replkv/bin/pip install --no-index --find-links .wheelhouse replkv; \
    else \
        /opt/replkv/bin/pip install .; \
    fi; \
    /opt/replkv/bin/pip uninstall -y -q pip setuptools 2>/dev/null || true; \
    /opt/replkv/bin/replctl --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="replkv" \
      org.opencontainers.image.description="A replicated key-value store: replnode, replrouter, replctl"
RUN groupadd --system --gid 10001 replkv \
    && useradd --system --uid 10001 --gid replkv --home-dir /data --no-create-home \
               --shell /usr/sbin/nologin replkv \
    && mkdir -p /data \
    && chown replkv:replkv /data
COPY --from=build /opt/replkv /opt/replkv
ENV PATH=/opt/replkv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REPL_DATA_DIR=/data
USER replkv
WORKDIR /data
CMD ["replctl", "--help"]
