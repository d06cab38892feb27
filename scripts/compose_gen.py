#!/usr/bin/env python3
"""Print a compose file for a master and N slaves: `python3 scripts/compose_gen.py N`.

docker-compose.yml is this script's output for N=3, word for word (a test holds them equal):
change the cluster's compose setup here, then `python3 scripts/compose_gen.py 3 >
docker-compose.yml`. `--prometheus N` prints the scrape configuration of the `monitoring`
profile for the same cluster instead; deploy/compose/prometheus.yml is its output for N=3.
For another number of slaves, write the output beside it and name it with `-f`
(docs/DOCKER.md, "Another number of slaves"); `docker compose up --scale` cannot do this, as
every slave is a node of its own, with its own id, address and volume.
"""

from __future__ import annotations

import sys

MAX_SLAVES = 20

HEADER = """\
# replkv in containers: a master (n1), {count} and the router, on one network.
# Read by `docker compose` (v2) and `docker-compose` (v1) alike. docs/DOCKER.md walks through it.
# Made by `python3 scripts/compose_gen.py {slaves}`; for another number of slaves, see
# "Another number of slaves" in docs/DOCKER.md (`docker compose up --scale` cannot do it).
#
#   docker compose up -d --build         # build the image, start the cluster
#   replctl --router 127.0.0.1:7000 write k v    # from the host, through the published port
#   redis-cli -p 6380 get k                      # Redis clients: the router's RESP2 port
#   docker compose exec router replctl status
#   docker compose --profile monitoring up -d --build   # and Prometheus on 127.0.0.1:9090
#
# Every process serves Prometheus metrics on port 9100 of its container (not published);
# the `monitoring` profile adds a Prometheus, built from Debian's package, that scrapes them.
#
# Settings, all optional, read from the environment or from a .env file beside this one:
#   REPL_ROUTER_PORT  host port published for the router          (default 7000)
#   REPL_RESP_PORT    host port published for its Redis (RESP2) port (default 6380)
#   REPL_ROUTER_BIND  host address those (and Prometheus) are published on (default
#                     127.0.0.1; 0.0.0.0 to let other machines in: there is no authentication)
#   REPL_PROMETHEUS_PORT    host port of Prometheus's web UI and API  (default 9090)
#   REPL_PROMETHEUS_CONFIG  its scrape configuration   (default ./deploy/compose/prometheus.yml)
#   REPL_PROMETHEUS_IMAGE   tag of the Prometheus image (default replkv-prometheus:latest)
#   REPL_FSYNC        nodes' fsync policy: always | everysec | no (default always)
#   REPL_IMAGE        image tag to build and run                  (default replkv:latest)
#   REPL_BASE_IMAGE   base image of the build                     (default python:3.12-slim)
#
# Restart policy `on-failure:5`: a node whose process dies (a crash, an OOM kill) is started
# again by Docker and catches up by itself, up to 5 times from the last `up` or `start`; one
# that cannot start at all (a bad setting, a data directory another container holds) gives up
# after 5 quick tries (a few seconds) and shows `Exited` with its one-line error in `docker
# compose logs`, instead of restarting forever. A container you stop or kill yourself (`docker
# compose kill slave2`) stays down until `docker compose start slave2`. After the engine
# restarts (a reboot), `docker compose up -d` starts the cluster again.
# docs/DOCKER.md says why. Each node keeps its log and snapshots in a named volume, so `docker
# compose down` then `up` keeps the data; `docker compose down -v` deletes it.

# One image for every service. Only `master` says how to build it: the others use it as built
# (pull_policy: never, as it is on no registry) and start after master.
x-image: &image
  image: ${{REPL_IMAGE:-replkv:latest}}
  init: true
  restart: on-failure:5
  stop_grace_period: 10s

x-node: &node
  <<: *image
  command: ["replnode"]

x-slave: &slave
  <<: *node
  pull_policy: never
  depends_on: [master]

x-node-env: &node-env
  REPL_CLUSTER: {cluster}
  REPL_MASTER: n1
  REPL_DATA_DIR: /data
  REPL_FSYNC: ${{REPL_FSYNC:-always}}
  REPL_METRICS_LISTEN: 0.0.0.0:9100
  # `docker compose exec slave2 replctl ...` goes through the router unless told otherwise.
  REPL_ROUTER: router:7000

x-health: &health
  interval: 5s
  timeout: 3s
  retries: 3
  start_period: 30s

services:
  master:
    <<: *node
    build:
      context: .
      args:
        BASE_IMAGE: ${{REPL_BASE_IMAGE:-python:3.12-slim}}
    environment:
      <<: *node-env
      REPL_ID: n1
      REPL_LISTEN: 0.0.0.0:7001
    volumes:
      - master-data:/data
    healthcheck:
      <<: *health
      test: ["CMD", "replctl", "health", "127.0.0.1:7001"]
"""

SLAVE = """
  {service}:
    <<: *slave
    environment:
      <<: *node-env
      REPL_ID: {node}
      REPL_LISTEN: 0.0.0.0:{port}
    volumes:
      - {service}-data:/data
    healthcheck:
      <<: *health
      test: ["CMD", "replctl", "health", "127.0.0.1:{port}"]
"""

ROUTER = """
  router:
    <<: *image
    pull_policy: never
    command: ["replrouter"]
    environment:
      REPL_LISTEN: 0.0.0.0:7000
      REPL_RESP_LISTEN: 0.0.0.0:6379
      REPL_METRICS_LISTEN: 0.0.0.0:9100
      REPL_CLUSTER: {cluster}
      REPL_ROUTER: 127.0.0.1:7000
    ports:
      - "${{REPL_ROUTER_BIND:-127.0.0.1}}:${{REPL_ROUTER_PORT:-7000}}:7000"
      - "${{REPL_ROUTER_BIND:-127.0.0.1}}:${{REPL_RESP_PORT:-6380}}:6379"
    depends_on:
      master:
        condition: service_healthy
{slave_deps}    healthcheck:
      <<: *health
      test: ["CMD", "replctl", "health", "127.0.0.1:7000"]

  # Only with `--profile monitoring`: Prometheus, scraping every process's port 9100. Built
  # here from Debian's package (deploy/compose/prometheus/Dockerfile), as no registry is
  # assumed; docs/DOCKER.md, "Metrics and monitoring", says how to use prom/prometheus instead.
  prometheus:
    profiles: [monitoring]
    image: ${{REPL_PROMETHEUS_IMAGE:-replkv-prometheus:latest}}
    build:
      context: deploy/compose/prometheus
      args:
        BASE_IMAGE: ${{REPL_BASE_IMAGE:-python:3.12-slim}}
    init: true
    restart: on-failure:5
    volumes:
      - type: bind
        source: ${{REPL_PROMETHEUS_CONFIG:-./deploy/compose/prometheus.yml}}
        target: /etc/prometheus/prometheus.yml
        read_only: true
      - prometheus-data:/var/lib/prometheus
    ports:
      - "${{REPL_ROUTER_BIND:-127.0.0.1}}:${{REPL_PROMETHEUS_PORT:-9090}}:9090"
    depends_on: [router]

volumes:
  master-data:
{slave_volumes}  prometheus-data:
"""

PROMETHEUS = """\
# Prometheus's scrape configuration for the compose file's `monitoring` profile: every process
# of the cluster serves its metrics on port 9100 of its container (REPL_METRICS_LISTEN).
# Made by `python3 scripts/compose_gen.py --prometheus {slaves}`, for the compose file
# `python3 scripts/compose_gen.py {slaves}` makes. docs/OPERATIONS.md lists the metrics.
global:
  scrape_interval: 5s
  evaluation_interval: 5s

scrape_configs:
  - job_name: replkv
    static_configs:
      - targets:
{targets}"""


def render(slaves: int) -> str:
    """The compose file for a master (n1, port 7001) and `slaves` slaves (n2.., 7002..)."""
    names = [f"slave{i}" for i in range(1, slaves + 1)]
    node = {name: f"n{i + 1}" for i, name in enumerate(names, start=1)}
    port = {name: 7001 + i for i, name in enumerate(names, start=1)}
    cluster = ",".join(["n1=master:7001", *(f"{node[s]}={s}:{port[s]}" for s in names)])
    count = "one slave (n2)" if slaves == 1 else f"{_words(slaves)} slaves (n2..n{slaves + 1})"
    text = HEADER.format(count=count, slaves=slaves, cluster=cluster)
    for s in names:
        text += SLAVE.format(service=s, node=node[s], port=port[s])
    text += ROUTER.format(
        cluster=cluster,
        slave_deps="".join(f"      {s}:\n        condition: service_started\n" for s in names),
        slave_volumes="".join(f"  {s}-data:\n" for s in names),
    )
    return text


def render_prometheus(slaves: int) -> str:
    """The scrape configuration of the `monitoring` profile for the cluster of `render`."""
    services = ["master", *(f"slave{i}" for i in range(1, slaves + 1)), "router"]
    targets = "".join(f"          - {s}:9100\n" for s in services)
    return PROMETHEUS.format(slaves=slaves, targets=targets)


def _words(n: int) -> str:
    small = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    return small[n] if n < len(small) else str(n)


def main(argv: list[str]) -> int:
    usage = (
        f"usage: compose_gen.py [--prometheus] N   (N slaves, 1..{MAX_SLAVES}; 3 gives "
        "docker-compose.yml, or with --prometheus deploy/compose/prometheus.yml)"
    )
    if argv and argv[0] in {"-h", "--help"}:
        print(usage, file=sys.stderr)
        return 0
    prometheus = bool(argv) and argv[0] == "--prometheus"
    if prometheus:
        argv = argv[1:]
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        slaves = int(argv[0])
    except ValueError:
        slaves = 0
    if not 1 <= slaves <= MAX_SLAVES:
        print(
            f"compose_gen.py: error: N must be a whole number from 1 to {MAX_SLAVES}, "
            f"not {argv[0]!r}",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(render_prometheus(slaves) if prometheus else render(slaves))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
