#!/usr/bin/env bash
# Start (or repair) a single-node SLURM test cluster on this machine. Idempotent:
# when the cluster already runs in the requested mode and is healthy, it only checks.
#
#   tests/slurm/start-cluster.sh                 # slurmctld + slurmd + munged, no accounting
#   tests/slurm/start-cluster.sh --accounting    # + mariadb + slurmdbd, sacct works
#
# Re-running with the other mode rewrites slurm.conf and restarts slurmctld/slurmd
# (and starts or stops slurmdbd/mariadb). Needs root. Env: CLUSTER_TIMEOUT (s, default 60).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

ACCOUNTING=0
for arg in "$@"; do
    case $arg in
        --accounting) ACCOUNTING=1 ;;
        -h | --help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--accounting])" ;;
    esac
done
[[ $(id -u) == 0 ]] || die "must run as root"

# ---------------------------------------------------------------- packages
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed'; }

ensure_packages() {
    local missing=() p
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! "${apt[@]}" "${missing[@]}" >/dev/null; then
        log "apt-get install failed; running apt-get update and retrying"
        env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        "${apt[@]}" "${missing[@]}" >/dev/null
    fi
}

pkgs=(slurmctld slurmd slurm-client munge)
((ACCOUNTING)) && pkgs+=(slurmdbd mariadb-server)
ensure_packages "${pkgs[@]}"

install -d -m 0755 /etc/slurm "$SLURM_LOG_DIR" "$SLURM_STATE_DIR" \
    "$SLURM_STATE_DIR/slurmctld" "$SLURM_STATE_DIR/slurmd"

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if munge_ok; then return 0; fi
    stop_daemon "$MUNGE_PID" munged # a hung or stale munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$SLURM_LOG_DIR/munged.stderr" 2>&1
    wait_for "munge to answer" munge_ok || die "munged did not come up (see /var/log/munge/munged.log)"
}
start_munge

# ---------------------------------------------------------------- accounting: mariadb + slurmdbd
mariadb_ok() { mariadb-admin --socket="$MARIADB_SOCK" ping 2>/dev/null | grep -q alive; }

start_mariadb() {
    mariadb_ok && return 0
    stop_daemon "$MARIADB_PID" mariadbd
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising /var/lib/mysql"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    log "starting mariadbd"
    setsid -f /usr/sbin/mariadbd --user=mysql --pid-file="$MARIADB_PID" --socket="$MARIADB_SOCK" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        </dev/null >>"$SLURM_LOG_DIR/mariadb.log" 2>&1
    wait_for "mariadb to answer" mariadb_ok || die "mariadb did not come up (see $SLURM_LOG_DIR/mariadb.log)"
}

# Password of the slurm database user: kept in slurmdbd.conf, created once.
dbd_password() {
    local pw=""
    [[ -f $SLURMDBD_CONF ]] && pw=$(sed -n 's/^StoragePass=//p' "$SLURMDBD_CONF")
    [[ -n $pw ]] || pw=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
    echo "$pw"
}

write_slurmdbd_conf() {
    local pw=$1 tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by tests/slurm/start-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$SLURMDBD_PID
LogFile=$SLURM_LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$pw
EOF
    if ! cmp -s "$tmp" "$SLURMDBD_CONF"; then
        install -o root -g root -m 0600 "$tmp" "$SLURMDBD_CONF"
        stop_daemon "$SLURMDBD_PID" slurmdbd # picks the new file up below
    fi
    rm -f "$tmp"
    chown root:root "$SLURMDBD_CONF"
    chmod 0600 "$SLURMDBD_CONF"
}

slurmdbd_ok() { is_running "$SLURMDBD_PID" slurmdbd && sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

assoc_ok() { # cluster, account mylab and user root in it are registered (one sacctmgr call)
    [[ -n $(sacctmgr -n -P show assoc where cluster="$CLUSTER_NAME" account=mylab user=root format=user 2>/dev/null) ]]
}

start_accounting() {
    start_mariadb
    # Fast path: slurmdbd runs with the current config and everything is registered.
    if [[ -f $SLURMDBD_CONF ]] && is_running "$SLURMDBD_PID" slurmdbd && assoc_ok; then
        return 0
    fi
    local pw
    pw=$(dbd_password)
    mariadb --socket="$MARIADB_SOCK" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    write_slurmdbd_conf "$pw"
    if ! slurmdbd_ok; then
        stop_daemon "$SLURMDBD_PID" slurmdbd
        log "starting slurmdbd"
        slurmdbd </dev/null >>"$SLURM_LOG_DIR/slurmdbd.stderr" 2>&1
        wait_for "slurmdbd to answer" slurmdbd_ok || die "slurmdbd did not come up (see $SLURM_LOG_DIR/slurmdbd.log)"
    fi
    # Register the cluster, an account 'mylab' and root in it (only what is missing).
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER_NAME" format=cluster) ]]; then
        log "registering cluster $CLUSTER_NAME"
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P show account mylab format=account) ]]; then
        sacctmgr -i add account mylab Cluster="$CLUSTER_NAME" Description=gridsearch-tests Organization=mylab >/dev/null
    fi
    if ! assoc_ok; then
        sacctmgr -i add user root Account=mylab Cluster="$CLUSTER_NAME" >/dev/null
    fi
}

# ---------------------------------------------------------------- slurm.conf
write_slurm_conf() { # prints "changed" when the file was (re)written
    local tmp acct_lines
    if ((ACCOUNTING)); then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by tests/slurm/start-cluster.sh (accounting=$ACCOUNTING). Single-node test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_STATE_DIR/slurmctld
SlurmdSpoolDir=$SLURM_STATE_DIR/slurmd
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups / systemd here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# Fast scheduling for tests (~0.5 s submit -> done).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
DependencyParameters=kill_invalid_depend
# Keep finished jobs visible to squeue/scontrol for 10 minutes (no-accounting mode).
MinJobAge=600
MaxArraySize=1001
MaxJobCount=50000
InactiveLimit=0
KillWait=5
Waittime=0
JobCompType=jobcomp/none
$acct_lines
# The node advertises 16 CPUs and 64000 MB whatever the hardware has.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=16 RealMemory=64000 State=UNKNOWN
PartitionName=short Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=debug Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
    if cmp -s "$tmp" "$SLURM_CONF"; then
        rm -f "$tmp"
    else
        install -m 0644 "$tmp" "$SLURM_CONF"
        rm -f "$tmp"
        echo changed
    fi
}

# slurm.conf first: sacctmgr reads AccountingStorageType from it.
if [[ -n $(write_slurm_conf) ]]; then
    log "slurm.conf written (accounting=$ACCOUNTING)"
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$SLURMCTLD_PID" slurmctld
fi

if ((ACCOUNTING)); then
    start_accounting
else # leave nothing of the other mode behind
    stop_daemon "$SLURMDBD_PID" slurmdbd
    stop_daemon "$MARIADB_PID" mariadbd
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if ! is_running "$SLURMCTLD_PID" slurmctld || ! wait_for "slurmctld to answer" slurmctld_up; then
    stop_daemon "$SLURMCTLD_PID" slurmctld
    log "starting slurmctld"
    slurmctld </dev/null >>"$SLURM_LOG_DIR/slurmctld.stderr" 2>&1
    wait_for "slurmctld to answer" slurmctld_up || die "slurmctld did not come up (see $SLURM_LOG_DIR/slurmctld.log)"
fi

if ! is_running "$SLURMD_PID" slurmd; then
    rm -f "$SLURMD_PID"
    log "starting slurmd"
    slurmd -N localhost </dev/null >>"$SLURM_LOG_DIR/slurmd.stderr" 2>&1
fi

resume_node() {
    log "node state '$(node_state)': resuming"
    scontrol update nodename=localhost state=resume 2>/dev/null || true
}
if ! node_usable; then
    case "$(node_state)" in
        drain* | down) resume_node ;; # set by an admin or after a failure: needs a resume
        down\* | fail*) # not responding: usually clears once slurmd registers (ReturnToService=2)
            CLUSTER_TIMEOUT=5 wait_for "node to register" node_usable 2>/dev/null || resume_node ;;
    esac
    wait_for "node localhost to be usable" node_usable ||
        die "node state '$(node_state)' (see $SLURM_LOG_DIR/slurmd.log, scontrol show node localhost)"
fi

if ((ACCOUNTING)); then
    wait_for "sacct to answer" sacct -n -X -j 1 -o JobID || die "sacct does not answer"
fi
log "cluster $CLUSTER_NAME up (accounting=$ACCOUNTING), node localhost $(node_state)"
