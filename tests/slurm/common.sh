# Shared helpers for start-cluster.sh / stop-cluster.sh (sourced, not executed).
# shellcheck shell=bash disable=SC2034  # variables are used by the sourcing scripts

CLUSTER_NAME=gridsearch-test
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
SLURM_LOG_DIR=/var/log/slurm
SLURM_STATE_DIR=/var/lib/slurm
SLURMCTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
SLURMDBD_PID=/run/slurmdbd.pid
MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid
MARIADB_SOCK=/run/mysqld/mysqld.sock
# Seconds to wait for any one daemon / node state before giving up.
CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-60}

log() { echo "[${0##*/}] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pid_of PIDFILE COMM: print the pid recorded in PIDFILE if that process is alive and
# its command name is COMM; otherwise fall back to a process whose name is exactly COMM.
pid_of() {
    local pidfile=$1 comm=$2 pid=""
    if [[ -s $pidfile ]]; then
        pid=$(tr -dc 0-9 <"$pidfile")
        if [[ -n $pid ]] && alive "$pid" && [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$comm" ]]; then
            echo "$pid"; return 0
        fi
    fi
    for pid in $(pgrep -x "$comm" 2>/dev/null); do
        alive "$pid" && { echo "$pid"; return 0; }
    done
    return 1
}

is_running() { pid_of "$1" "$2" >/dev/null; }

# alive PID: the process exists and is not a zombie (pid 1 here reaps orphans lazily).
alive() {
    local stat
    stat=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# wait_for DESCRIPTION COMMAND...: poll COMMAND every 0.1 s until it succeeds or
# CLUSTER_TIMEOUT seconds pass.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + CLUSTER_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${CLUSTER_TIMEOUT}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

not_alive() { ! alive "$1"; }

# stop_daemon PIDFILE COMM: SIGTERM the daemon, wait for it to exit (SIGKILL after the
# timeout), remove its pid file. No-op when it is not running.
stop_daemon() {
    local pidfile=$1 comm=$2 pid
    while pid=$(pid_of "$pidfile" "$comm"); do
        log "stopping $comm (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_for "$comm to exit" not_alive "$pid"; then
            log "sending SIGKILL to $comm (pid $pid)"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for "$comm to die" not_alive "$pid" || true
        fi
    done
    rm -f "$pidfile"
}

slurmctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# Node state as sinfo prints it (idle, mixed, allocated, down*, drained, ...).
node_state() { sinfo -h -N -n localhost -o %T 2>/dev/null | head -n1; }

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing | planned) return 0 ;;
        *) return 1 ;;
    esac
}
