#!/usr/bin/env bash
# Stop the test cluster started by start-cluster.sh: cancel every job, then stop
# slurmd, slurmctld, slurmdbd, mariadb and munged. Idempotent (fine when nothing runs).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
[[ $(id -u) == 0 ]] || die "must run as root"

no_active_jobs() { [[ -z $(squeue -h -t PD,R,CG,S,CF -o %A 2>/dev/null) ]]; }

if command -v scontrol >/dev/null && is_running "$SLURMCTLD_PID" slurmctld && slurmctld_up; then
    users=$(squeue -h -o %u 2>/dev/null | sort -u)
    for u in $users; do scancel -u "$u" || true; done
    [[ -z $users ]] || CLUSTER_TIMEOUT=30 wait_for "jobs to finish cancelling" no_active_jobs || true
fi

stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$SLURMCTLD_PID" slurmctld
stop_daemon "$SLURMDBD_PID" slurmdbd
stop_daemon "$MARIADB_PID" mariadbd
stop_daemon "$MUNGE_PID" munged
log "cluster stopped"
