#!/usr/bin/env bash
# A private Docker engine for replkv's Docker test tier (and for trying the compose file on a
# machine that has no Docker engine running).
#
#   scripts/docker_engine.sh install      [DIR]  apt-get what is missing (dockerd, docker-compose,
#                                                debootstrap, iptables); nothing else
#   scripts/docker_engine.sh start        [DIR]  install, save the host firewall, start dockerd
#   scripts/docker_engine.sh base-image   [DIR]  build local/base:latest offline with debootstrap
#                                                (Debian bookworm + python3); skipped if present
#   scripts/docker_engine.sh wheelhouse   [DIR]  make .wheelhouse/ in the repository: wheels of
#                                                replkv's dependencies and build backend for the
#                                                base image's Python (asked of the image), so the
#                                                image build needs no network
#   scripts/docker_engine.sh env          [DIR]  print `export DOCKER_HOST=unix://DIR/docker.sock`
#   scripts/docker_engine.sh stop         [DIR]  stop dockerd by the PID in its pidfile, then put
#                                                back the firewall, ip forwarding and links
#   scripts/docker_engine.sh purge        [DIR]  stop, then delete DIR (images, volumes, caches)
#   scripts/docker_engine.sh status       [DIR]  exit 0 iff this engine answers
#
# DIR defaults to $REPL_DOCKER_DIR, else /tmp/replkv-docker. Everything the engine keeps is
# under DIR: data-root, exec-root, the socket, the pidfile, its log and the saved host state.
# Every subcommand is idempotent. The daemon is only ever stopped through its own pidfile.
#
# Environment: REPL_BASE_IMAGE (default local/base:latest), REPL_DEBIAN_MIRROR (default: the
# host's apt mirror, else http://deb.debian.org/debian), REPL_DEBIAN_SUITE (default bookworm),
# PYTHON (the host's Python whose pip makes the wheelhouse; default python3).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

cmd=${1:-}
[ -n "$cmd" ] || usage
dir=${2:-${REPL_DOCKER_DIR:-/tmp/replkv-docker}}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sock="$dir/docker.sock"
pidfile="$dir/dockerd.pid"
state="$dir/host-state"
log="$dir/dockerd.log"
base_image=${REPL_BASE_IMAGE:-local/base:latest}
suite=${REPL_DEBIAN_SUITE:-bookworm}
export DOCKER_HOST="unix://$sock"

say() { echo "docker_engine: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "'$cmd' needs root (it installs packages, runs dockerd and changes the firewall)"
}

# ---------------------------------------------------------------------------------------------
# install

install_missing() {
    local pkgs=()
    command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || pkgs+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
    command -v iptables-save >/dev/null 2>&1 || pkgs+=(iptables)
    # With the nf_tables backend, only `nft` can delete a table dockerd made (stop uses it).
    if ! command -v nft >/dev/null 2>&1; then
        if ! command -v iptables >/dev/null 2>&1 || iptables --version 2>/dev/null | grep -q nf_tables; then
            pkgs+=(nftables)
        fi
    fi
    # docker.io brings the `docker` client too; a client already on PATH is fine as it is.
    [ ${#pkgs[@]} -gt 0 ] || return 0
    need_root
    say "installing ${pkgs[*]}"
    # Never let the package start the system's docker service: that daemon would change the
    # firewall and listen on /var/run/docker.sock behind our back.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$dir/apt.log" 2>&1; then
        apt-get update -q >>"$dir/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$dir/apt.log" 2>&1 || rc=$?
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$rc" != 0 ]; then
        tail -n 20 "$dir/apt.log" >&2
        die "apt-get install ${pkgs[*]} failed (log: $dir/apt.log)"
    fi
}

# ---------------------------------------------------------------------------------------------
# host state: firewall, forwarding sysctls, network links

sysctls=(net.ipv4.ip_forward net.ipv6.conf.all.forwarding
         net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)

save_host_state() {
    # Saved once per start/stop cycle: a second `start` (or a start after a crash) keeps the
    # state from before the first one, which is the one to go back to.
    if [ -e "$state/saved" ]; then
        return 0
    fi
    rm -rf "$state"
    mkdir -p "$state"
    iptables-save > "$state/iptables.v4"
    if command -v ip6tables-save >/dev/null 2>&1; then
        ip6tables-save > "$state/iptables.v6" 2>/dev/null || true
    fi
    : > "$state/sysctl"
    local key
    for key in "${sysctls[@]}"; do
        if [ -e "/proc/sys/${key//.//}" ]; then
            echo "$key=$(sysctl -n "$key")" >> "$state/sysctl"
        fi
    done
    if command -v nft >/dev/null 2>&1; then
        nft list tables > "$state/nft-tables" 2>/dev/null || true
    fi
    ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort > "$state/links"
    touch "$state/saved"
}

# Prints the ruleset in a form where "the same firewall" compares equal: no comments, no
# counters, and no table that holds only built-in chains with ACCEPT policies and no rules
# (iptables-nft and iptables-legacy both leave such an empty table behind once it was used).
normalize_rules() {
    python3 - "$1" <<'EOF'
import re, sys
tables, cur = [], None
for line in open(sys.argv[1]).read().splitlines():
    if not line or line.startswith("#"):
        continue
    if line.startswith("*"):
        cur = [line]
        continue
    if line == "COMMIT":
        body = cur[1:]
        empty = all(re.match(r"^:\S+ ACCEPT ", l) for l in body)
        if not empty:
            tables.append("\n".join(cur + ["COMMIT"]))
        cur = None
        continue
    cur.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
print("\n".join(sorted(tables)))
EOF
}

restore_family() {  # $1 = iptables | ip6tables, $2 = saved file
    local tool=$1 saved=$2
    command -v "$tool-save" >/dev/null 2>&1 || return 0
    [ -e "$saved" ] || return 0
    local now
    now=$(mktemp)
    "$tool-save" > "$now" 2>/dev/null || true
    # Tables that exist now but did not before: empty them (rules, user chains, policies).
    local t
    for t in $(grep '^\*' "$now" | tr -d '*'); do
        if ! grep -qx "\*$t" "$saved"; then
            "$tool" -t "$t" -F 2>/dev/null || true
            "$tool" -t "$t" -X 2>/dev/null || true
            local c
            "$tool-save" -t "$t" 2>/dev/null | awk '/^:/ && $2 != "-" {print substr($1, 2)}' |
                while read -r c; do "$tool" -t "$t" -P "$c" ACCEPT 2>/dev/null || true; done
        fi
    done
    # Tables that existed before get back exactly what they had.
    if grep -q '^\*' "$saved"; then
        "$tool-restore" < "$saved"
    fi
    rm -f "$now"
}

restore_host_state() {
    [ -e "$state/saved" ] || return 0
    restore_family iptables "$state/iptables.v4"
    restore_family ip6tables "$state/iptables.v6"
    # nf_tables backend: the tables dockerd created are empty now; delete them so that the
    # ruleset is exactly what it was (`nft list ruleset` included).
    if [ -e "$state/nft-tables" ] && command -v nft >/dev/null 2>&1; then
        local fam name
        nft list tables 2>/dev/null | while read -r _ fam name; do
            case "$fam:$name" in
                ip:filter|ip:nat|ip:mangle|ip:raw|ip:security|ip6:filter|ip6:nat|ip6:mangle|ip6:raw|ip6:security)
                    grep -qx "table $fam $name" "$state/nft-tables" ||
                        nft delete table "$fam" "$name" 2>/dev/null || true ;;
            esac
        done
    fi
    local line
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        sysctl -q -w "$line" >/dev/null 2>&1 || say "warning: could not restore $line"
    done < "$state/sysctl"
    # Links the engine made (docker0, br-*, veth*) and left behind.
    local link
    for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort |
                  comm -13 "$state/links" -); do
        case "$link" in
            docker0|br-*|veth*) ip link delete "$link" 2>/dev/null || true ;;
        esac
    done
    # Check, and say so loudly if the firewall is not what it was.
    local now
    now=$(mktemp)
    iptables-save > "$now"
    if ! diff <(normalize_rules "$state/iptables.v4") <(normalize_rules "$now") >"$state/diff" 2>&1; then
        say "error: the IPv4 firewall differs from the one saved before start:"
        cat "$state/diff" >&2
        rm -f "$now"
        return 3
    fi
    rm -f "$now"
    rm -rf "$state"
}

# ---------------------------------------------------------------------------------------------
# daemon

daemon_pid() {  # prints the PID if the pidfile names a live dockerd
    [ -s "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

answers() {
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

start() {
    install_missing
    need_root
    if daemon_pid >/dev/null && answers; then
        say "already running (pid $(daemon_pid)), DOCKER_HOST=$DOCKER_HOST"
        return 0
    fi
    save_host_state
    mkdir -p "$dir/data" "$dir/exec"
    rm -f "$sock"
    say "starting dockerd (log: $log)"
    # setsid: the daemon is not in the caller's process group, so a ^C in the caller does not
    # reach it; it is stopped only by `stop`, by its PID.
    setsid dockerd \
        --data-root "$dir/data" \
        --exec-root "$dir/exec" \
        --pidfile "$pidfile" \
        --host "unix://$sock" \
        --storage-driver overlay2 \
        --containerd-namespace replkv \
        --containerd-plugins-namespace replkv-plugins \
        >"$log" 2>&1 </dev/null &
    local deadline=$((SECONDS + 90))
    until answers; do
        if [ $SECONDS -ge $deadline ] || ! kill -0 $! 2>/dev/null; then
            tail -n 30 "$log" >&2 || true
            die "dockerd did not come up (log: $log)"
        fi
        sleep 0.2
    done
    say "dockerd running (pid $(daemon_pid)), DOCKER_HOST=$DOCKER_HOST"
}

stop() {
    local pid
    if pid=$(daemon_pid); then
        say "stopping dockerd pid $pid"
        kill -TERM "$pid"
        local deadline=$((SECONDS + 60))
        while [ -d "/proc/$pid" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if [ -d "/proc/$pid" ]; then
            say "dockerd pid $pid still running after 60 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while [ -d "/proc/$pid" ]; do sleep 0.1; done
        fi
    fi
    rm -f "$pidfile" "$sock"
    # Mounts dockerd may leave behind when it dies hard (overlay layers, netns handles).
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
        while IFS= read -r m; do umount -l "$m" 2>/dev/null || true; done
    restore_host_state
}

# ---------------------------------------------------------------------------------------------
# offline base image

host_mirror() {
    local m=""
    if [ -n "${REPL_DEBIAN_MIRROR:-}" ]; then
        echo "$REPL_DEBIAN_MIRROR"; return
    fi
    m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '{print $2}' | grep -v -- '-security' | grep '/debian/*$' | head -n 1 || true)
    if [ -z "$m" ]; then
        m=$(grep -hs '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' |
            grep '/debian/*$' | head -n 1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

base_image() {
    answers || die "no engine at $DOCKER_HOST: run '$0 start' first"
    if docker image inspect "$base_image" >/dev/null 2>&1; then
        say "$base_image already present"
        return 0
    fi
    install_missing
    need_root
    local tarball="$dir/base-$suite.tar"
    if [ ! -s "$tarball" ]; then
        local rootfs="$dir/rootfs"
        rm -rf "$rootfs"
        local mirror
        mirror=$(host_mirror)
        say "debootstrap $suite from $mirror (log: $dir/debootstrap.log)"
        # python3-venv brings ensurepip with its bundled pip, so the image can build a venv and
        # install wheels with no network; passwd gives useradd for the non-root user.
        if ! debootstrap --variant=minbase \
                --include=python3-minimal,python3-venv,passwd,ca-certificates \
                "$suite" "$rootfs" "$mirror" >"$dir/debootstrap.log" 2>&1; then
            tail -n 20 "$dir/debootstrap.log" >&2
            awk -v d="$rootfs/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
                xargs -r umount -l
            die "debootstrap failed (log: $dir/debootstrap.log)"
        fi
        # Keep the image small: package lists, caches and docs are no use inside it.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
               "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
               "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
               "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    say "importing $tarball as $base_image"
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$base_image" >/dev/null
    say "$base_image ready"
}

# ---------------------------------------------------------------------------------------------
# wheels for an offline image build

repo=$(cd "$(dirname "$0")/.." && pwd)

wheelhouse() {
    answers || die "no engine at $DOCKER_HOST: run '$0 start' first"
    docker image inspect "$base_image" >/dev/null 2>&1 ||
        die "no image $base_image: run '$0 base-image' first (or set REPL_BASE_IMAGE)"
    local py=${PYTHON:-python3}
    "$py" -m pip --version >/dev/null 2>&1 ||
        die "'$py -m pip' does not run: install pip for it (apt-get install python3-pip) or set PYTHON"
    # The wheels must suit the Python of the image, not the host's: ask the image.
    local version machine
    read -r version machine < <(docker run --rm "$base_image" python3 -c \
        'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())') ||
        die "could not run python3 in $base_image"
    local out="$repo/.wheelhouse"
    say "wheels for CPython $version on $machine ($base_image) in $out"
    # What the image's `pip install .` needs besides the source: replkv's dependencies and its
    # build backend, as pyproject.toml names them. replkv itself is built from the source in
    # the image, so the wheelhouse never holds a stale copy of it.
    local reqs=()
    mapfile -t reqs < <("$py" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
print("\n".join(meta["build-system"]["requires"] + meta["project"]["dependencies"]))
' "$repo/pyproject.toml") || die "could not read the requirements from pyproject.toml (needs Python >= 3.11)"
    [ ${#reqs[@]} -gt 0 ] || die "pyproject.toml names no requirements"
    rm -rf "$out"
    mkdir -p "$out"
    local platforms=() tag
    for tag in manylinux_2_36 manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 linux; do
        platforms+=(--platform "${tag}_$machine")
    done
    "$py" -m pip --disable-pip-version-check download -q --only-binary=:all: \
        --implementation cp --python-version "$version" "${platforms[@]}" -d "$out" "${reqs[@]}" ||
        die "pip download of ${reqs[*]} for CPython $version failed"
    say "$(cd "$out" && ls *.whl | tr '\n' ' ')"
}

case "$cmd" in
    install) install_missing ;;
    start) start ;;
    base-image|base_image) base_image ;;
    wheelhouse) wheelhouse ;;
    stop) stop ;;
    purge) stop; rm -rf "$dir"; say "removed $dir" ;;
    env) echo "export DOCKER_HOST=unix://$sock" ;;
    status) answers ;;
    -h|--help|help) usage ;;
    *) say "unknown subcommand: $cmd"; usage ;;
esac
