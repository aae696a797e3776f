#!/usr/bin/env bash
# Stop the daemons .ci/slurm-start.sh started, by the pids it recorded (slurmd, slurmctld, munged).
set -uo pipefail
PIDS="${WSIMTL_SLURM_PIDS:-/tmp/wsimtl-slurm.pids}"
[ -s "$PIDS" ] || { echo "slurm-stop: nothing recorded in $PIDS" >&2; exit 0; }
for name in slurmd slurmctld munged; do
  pid="$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")"
  [ -n "$pid" ] || continue
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi
    echo "slurm-stop: stopped $name ($pid)" >&2
  fi
done
rm -f "$PIDS"
