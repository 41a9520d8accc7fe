#!/usr/bin/env bash
# A real single-node Slurm cluster for the slurm-marked tests (tests/test_slurm.py).
#
# Idempotent: installs the Debian packages when missing, writes /etc/slurm/slurm.conf for this
# host, creates the munge key when absent, starts munged, slurmctld and slurmd (no systemd
# needed), then waits until `sinfo` shows the node idle. Exits 0 when the cluster answers;
# 3 with a message when this machine cannot host it (not root, no apt-get, no package mirror),
# 1 when it should work but does not (a daemon does not start, the node does not come up).
#
#   bash .ci/slurm-up.sh          # then: sinfo; sbatch --wrap 'hostname' --wait
#
# Environment: SLURM_UP_TIMEOUT (seconds to wait for the node, default 90).
set -euo pipefail

say() { echo "slurm-up: $*" >&2; }
die() { say "$*"; exit 1; }           # a real failure: the daemons do not come up
cannot() { say "$*"; exit 3; }        # this machine cannot host the cluster (tests skip on 3)

TIMEOUT="${SLURM_UP_TIMEOUT:-90}"
HOST="$(hostname -s)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }
node_ready() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }
running() {  # a live process of that name (not a zombie left by a daemon's double fork)
    local pid
    for pid in $(pgrep -x "$1" 2>/dev/null); do
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] && [ -e "/proc/$pid" ] && return 0
    done
    return 1
}

# --- slurm.conf (written further down; compared first) --------------------------------------------------------------------------
CPUS="$(nproc)"
MEM_TOTAL="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"  # MB, as `free -m`
HEADROOM=$(( MEM_TOTAL / 10 > 512 ? MEM_TOTAL / 10 : 512 ))   # leave 10% (>= 512 MB) to the system
REAL_MEM=$(( MEM_TOTAL - HEADROOM ))
[ "$REAL_MEM" -ge 256 ] || REAL_MEM=256
DEF_MEM=$(( REAL_MEM / CPUS ))                                  # a job without --mem: its CPUs' share
new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat > "$new_conf" <<EOF
# Written by .ci/slurm-up.sh: a single-node cluster for tests (node $HOST, everything as root).
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Already up with this config (a second call): nothing to do. All three daemons must be running
# here: slurmctld keeps showing a dead slurmd's node as idle until SlurmdTimeout, and jobs would
# then hang.
if command -v sinfo >/dev/null 2>&1 && cmp -s "$new_conf" "$CONF" \
        && running munged && running slurmctld && running slurmd && node_ready; then
    say "cluster already up: node $HOST is $(node_state)"
    exit 0
fi

[ "$(id -u)" = 0 ] || cannot "needs root (installs packages, writes /etc/slurm, starts daemons); run as root or skip the slurm tests"

# --- packages ----------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge pgrep:procps; do
    cmd="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${need[*]} and no apt-get to install them"
    say "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # No init system here: keep the packages' postinst scripts from starting services.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_ok=1
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || apt_ok=0
    if [ "$apt_ok" = 1 ]; then
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >&2 || apt_ok=0
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$apt_ok" = 1 ] || cannot "apt-get could not install ${need[*]} (no package mirror reachable?)"
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- munge -------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "the munge package did not create the munge user"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if [ -x /usr/sbin/mungekey ]; then
        /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! running munged; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
fi
for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged does not answer (see /var/log/munge/munged.log)"

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm
changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    changed=1
    say "wrote $CONF (node $HOST: CPUs=$CPUS RealMemory=${REAL_MEM}M)"
fi

# --- daemons -----------------------------------------------------------------------------
stop_daemon() {  # our own daemons only: by the pid file slurm wrote
    local pid
    pid="$(cat "/run/slurm/$1.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping $1 (pid $pid) to apply the new slurm.conf"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do running "$1" || break; sleep 0.5; done
    fi
}
if [ "$changed" = 1 ]; then stop_daemon slurmd; stop_daemon slurmctld; fi
if ! running slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
fi
if ! running slurmd; then
    say "starting slurmd"
    /usr/sbin/slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
fi

# --- wait for the node -------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while ! node_ready; do
    state="$(node_state)"
    case "$state" in
        down|drained|draining|drain|fail|failing)   # e.g. left down by an earlier unclean stop
            if [ "$resumed" = 0 ]; then
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        say "node $HOST is '${state:-not listed}' after ${TIMEOUT}s; last log lines:"
        tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
        exit 1
    fi
    sleep 1
done
say "cluster up: node $HOST is $(node_state) (CPUs=$CPUS RealMemory=${REAL_MEM}M)"
