#!/usr/bin/env bash
# A real two-node Slurm on this machine, for the launcher's tests (Debian packages, run as root, no systemd).
#
#   scripts/slurm_cluster.sh up      install slurmctld/slurmd/slurm-client/munge if missing, write the config,
#                                    start munged, slurmctld and one slurmd per node (node1, node2 on 127.0.0.1,
#                                    ports 17101/17102), wait until both nodes are idle
#   scripts/slurm_cluster.sh down    cancel jobs, stop every daemon it started (by PID file only)
#   scripts/slurm_cluster.sh status
#
# Both "nodes" share this host's name and address, so nothing may rely on hostnames differing. The daemons
# keep their state, logs and PID files under $MEMDLM_SLURM_DIR (default /tmp/memdlm-slurm).
set -euo pipefail

DIR=${MEMDLM_SLURM_DIR:-/tmp/memdlm-slurm}
NODES=(node1 node2)
CONF=/etc/slurm/slurm.conf

say() { echo "[slurm_cluster $(date +%T)] $*" >&2; }
fail() {
  say "error: $*"
  for f in "$DIR"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}
# retry SECONDS COMMAND...: rerun COMMAND every 0.25 s until it succeeds
retry() { local until=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$until" ] || return 1; sleep 0.25; done; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {
  running "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill "$pid" 2>/dev/null || true
  retry 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || fail "Slurm is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge"
  say "installing slurmctld slurmd slurm-client munge"
  local blocker=/usr/sbin/policy-rc.d ours=0
  if [ ! -e $blocker ]; then printf '#!/bin/sh\nexit 101\n' > $blocker; chmod +x $blocker; ours=1; fi  # no auto-start
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ $ours = 1 ] && rm -f $blocker
  return 0
}

munge_up() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || { if command -v mungekey >/dev/null; then mungekey --create --force; \
                                   else create-munge-key -f; fi; }
  mkdir -p /var/lib/munge /var/log/munge /run/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/log/munge; chmod 0600 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/memdlm-munged.pid  # a directory munge may write
  retry 30 bash -c 'munge -n | unmunge' || fail "munged does not answer"
  retry 10 test -s /run/munge/memdlm-munged.pid && cp /run/munge/memdlm-munged.pid "$DIR/munged.pid"  # ours to stop
}

configure() {
  local host cpus memory
  host=$(hostname -s)
  for name in "$host" "${NODES[@]}"; do
    getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >> /etc/hosts
  done
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 / ${#NODES[@]} ))
  mkdir -p /etc/slurm "$DIR"
  cat > "$CONF" <<EOF
# written by memdlm's scripts/slurm_cluster.sh: two emulated nodes on 127.0.0.1
ClusterName=memdlm
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmdParameters=config_overrides
EOF
  local port=17100
  for name in "${NODES[@]}"; do
    port=$((port + 1))
    echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$memory State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

idle() {
  local states; states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u)
  for name in "${NODES[@]}"; do grep -qx "$name=idle" <<<"$states" || return 1; done
}

up() {
  local started; started=$(date +%s.%N)
  install
  mkdir -p "$DIR"
  munge_up
  running "$DIR/slurmctld.pid" && fail "slurmctld is already running; run '$0 down' first"
  configure
  rm -rf "$DIR/state" "$DIR"/spool-*
  mkdir -p "$DIR/state"
  slurmctld
  retry 60 scontrol ping || fail "slurmctld does not answer"
  for name in "${NODES[@]}"; do mkdir -p "$DIR/spool-$name"; slurmd -N "$name"; done
  retry 60 idle || fail "nodes not idle: $(sinfo -h -N -o '%N=%t' 2>&1 | tr '\n' ' ')"
  say "up in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $started}") s: ${NODES[*]}"
}

down() {
  if running "$DIR/slurmctld.pid"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    retry 30 bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]' || true
  fi
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do [ -e "$pidfile" ] && stop "$pidfile"; done
  say "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) for f in "$DIR"/*.pid; do running "$f" && echo "$(basename "$f" .pid): pid $(cat "$f")"; done
          running "$DIR/slurmctld.pid" && sinfo -N ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
