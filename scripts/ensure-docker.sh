#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock.
#
# Idempotent: installs what is missing (docker.io, debootstrap, docker-registry)
# when run as root, and starts dockerd in the background only when `docker info`
# fails. Safe to run before every test run.
#
# The engine is started with no bridge, no iptables and no masquerading: cyclone
# containers run with `--network none`, and this host may not let us touch its
# firewall. Storage is overlay2 where the kernel has overlayfs, vfs otherwise
# (vfs copies every layer in full: slow and big, but it works everywhere).
#
# Environment:
#   DOCKERD_LOG       log file of the started dockerd (default below)
#   DOCKERD_PIDFILE   where the started dockerd's pid is written
#   DOCKERD_WAIT_S    how long to wait for `docker info` (default 60)
set -euo pipefail

SOCKET=/var/run/docker.sock
WAIT_S=${DOCKERD_WAIT_S:-60}
PACKAGES=(docker.io debootstrap docker-registry)

say() { printf 'ensure-docker: %s\n' "$*"; }
die() { printf 'ensure-docker: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Where logs and the pid file go: /var/log and /run when we may write there.
if is_root; then
    LOG=${DOCKERD_LOG:-/var/log/veritech-dockerd.log}
    PIDFILE=${DOCKERD_PIDFILE:-/run/veritech-dockerd.pid}
else
    LOG=${DOCKERD_LOG:-/tmp/veritech-dockerd.log}
    PIDFILE=${DOCKERD_PIDFILE:-/tmp/veritech-dockerd.pid}
fi

docker_ok() { docker info >/dev/null 2>&1; }

# 1. Install the packages that are missing (only root can).
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if is_root; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "warning: not root, cannot install missing packages: ${missing[*]}"
    fi
fi
command -v docker >/dev/null || die "no docker command on PATH"

# 2. An engine already answers: nothing to do.
if docker_ok; then
    say "docker engine is up ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

# 3. Start one ourselves: that needs root and the dockerd binary.
is_root || die "docker engine is not running and only root can start dockerd"
DOCKERD=$(command -v dockerd || true)
[ -n "$DOCKERD" ] || die "dockerd not found (install docker.io)"

# A pid file from an earlier start whose process still runs means that dockerd
# is starting or wedged; starting a second one on the same socket would fail.
if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    say "dockerd $(cat "$PIDFILE") from an earlier start is running; waiting for it"
else
    if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then
        drivers=(overlay2 vfs)
    else
        drivers=(vfs)
    fi
fi

# wait_for_engine PID: 0 when `docker info` answers, 1 when PID died or time ran out.
wait_for_engine() {
    local pid=$1 deadline=$((SECONDS + WAIT_S))
    while [ "$SECONDS" -lt "$deadline" ]; do
        docker_ok && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

if [ -n "${drivers+x}" ]; then
    for driver in "${drivers[@]}"; do
        say "starting dockerd (storage driver $driver), log: $LOG"
        # setsid: the engine must outlive this script and its terminal.
        setsid "$DOCKERD" \
            --bridge=none --iptables=false --ip-masq=false \
            --host=unix://$SOCKET \
            --storage-driver="$driver" \
            >>"$LOG" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$PIDFILE"
        if wait_for_engine "$pid"; then
            say "docker engine is up: dockerd pid $pid (pid file $PIDFILE)"
            exit 0
        fi
        if kill -0 "$pid" 2>/dev/null; then
            # Alive but silent for WAIT_S: another driver will not help.
            die "dockerd $pid did not answer within ${WAIT_S}s; see $LOG"
        fi
        say "dockerd exited with storage driver $driver; last log lines:"
        tail -n 5 "$LOG" | sed 's/^/    /'
        rm -f "$PIDFILE"
    done
    die "could not start dockerd; see $LOG"
fi

pid=$(cat "$PIDFILE")
wait_for_engine "$pid" || die "dockerd $pid did not answer within ${WAIT_S}s; see $LOG"
say "docker engine is up: dockerd pid $pid (pid file $PIDFILE)"
