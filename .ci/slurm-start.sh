#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the `slurm` tests (root; no systemd, no cgroups).
#
#   bash .ci/slurm-start.sh     # installs Debian's slurm-wlm when missing, then starts
#                               # munged, slurmctld and slurmd; their pids go to $WSIMTL_SLURM_PIDS
#   bash .ci/slurm-stop.sh      # stops exactly those pids
#
# The configuration is .ci/slurm.conf; the node line is rewritten to the CPUs and memory slurmd
# detects here, so the node is never drained for claiming more than it has.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PIDS="${WSIMTL_SLURM_PIDS:-/tmp/wsimtl-slurm.pids}"

log() { echo "slurm-start: $*" >&2; }

if sinfo -h >/dev/null 2>&1; then
  log "a SLURM controller already answers; leaving it alone (nothing recorded in $PIDS)"
  sinfo
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (starts munged, slurmctld and slurmd)"; exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm from the Debian archive"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null
fi

# configuration: ours, with the node's CPUs and memory as slurmd sees them
detected="$(slurmd -C | head -n 1)"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")"
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")"
mem=$(( mem * 9 / 10 ))
[ "$mem" -gt 16000 ] && mem=16000
mkdir -p /etc/slurm
sed -e "s/^NodeName=localhost .*/NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN/" \
    "$HERE/slurm.conf" > /etc/slurm/slurm.conf
chmod 0644 /etc/slurm/slurm.conf
log "node: CPUs=$cpus RealMemory=${mem}MB"

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  head -c 1024 /dev/urandom > /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

: > "$PIDS"
wait_for() {  # wait_for <what> <tries> <command...>: poll every 0.2 s
  local what="$1" tries="$2"; shift 2
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "$what did not come up; see /var/log/slurm and /var/log/munge"; return 1
}

if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  wait_for munged 50 test -S /run/munge/munge.socket.2
  echo "munged $(cat /run/munge/munged.pid)" >> "$PIDS"
fi
munge -n </dev/null | unmunge >/dev/null

/usr/sbin/slurmctld -i
wait_for slurmctld 150 scontrol ping
echo "slurmctld $(cat /run/slurm/slurmctld.pid)" >> "$PIDS"

/usr/sbin/slurmd -N localhost
node_idle() { [ "$(sinfo -h -n localhost -o %T)" = idle ]; }
wait_for slurmd 150 node_idle
echo "slurmd $(cat /run/slurm/slurmd.pid)" >> "$PIDS"

sinfo
log "started; pids in $PIDS:"
cat "$PIDS" >&2
