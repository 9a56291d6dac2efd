#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying and testing `python -m tools.study --launcher slurm`.
#
#   bash tools/slurm_local/setup.sh [--install] [--dir DIR]    # configure and start munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf                           # what sbatch/squeue/scancel read (printed at the end)
#   bash tools/slurm_local/setup.sh --stop [--dir DIR]         # stop the daemons started here
#
# --install first installs Debian's packages (slurmctld, slurmd, slurm-client, munge; root, apt). Everything else
# stays in DIR (default /tmp/slurm_local: configuration, state, logs, pid files); nothing under /etc is changed
# (munge uses the key its package created). The node is this host (localhost), with every CPU and its memory, one
# partition "local" (the default), no accounting, and cgroups off (process tracking by /proc, no task affinity), so
# it runs in a container. Run it as root (the daemons run as root). Exit status 0 once `sinfo` sees the node idle.
set -euo pipefail

dir=/tmp/slurm_local
install=0
stop=0
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install=1 ;;
    --stop) stop=1 ;;
    --dir) dir="$2"; shift ;;
    *) echo "setup.sh: unknown option $1 (use --install, --stop, --dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
conf="$dir/slurm.conf"

stop_daemon() {  # $1: pid file
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$1"
}

if [ "$stop" -eq 1 ]; then
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munged.pid"
  echo "stopped the local SLURM daemons of $dir"
  exit 0
fi

if [ "$install" -eq 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
for tool in munged slurmctld slurmd sbatch squeue sinfo; do
  if ! command -v "$tool" >/dev/null; then
    echo "setup.sh: $tool not found; install SLURM and munge first (setup.sh --install, as root on Debian)" >&2
    exit 3
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (the local daemons run as root)" >&2
  exit 3
fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$dir/ctld" "$dir/spool" "$dir/munge"

cat >"$conf" <<EOF
# Written by tools/slurm_local/setup.sh: a single-node cluster on $host.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

stop_daemon "$dir/slurmd.pid"
stop_daemon "$dir/slurmctld.pid"
for port in 6817 6818; do  # another cluster's daemons (another --dir, a system SLURM) would answer in ours' place
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "setup.sh: port $port is in use (another slurmctld/slurmd?); stop it, or use its SLURM_CONF" >&2
    exit 5
  fi
done

# munged: its own socket and pid file in $dir, the key of the munge package; as root (--force), like the other
# daemons, so that $dir may sit in a folder only root can enter (a test's temporary folder)
if ! { [ -f "$dir/munged.pid" ] && kill -0 "$(cat "$dir/munged.pid")" 2>/dev/null; }; then
  rm -f "$dir/munge/munged.pid"
  munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  for _ in $(seq 50); do [ -s "$dir/munge/munged.pid" ] && break; sleep 0.1; done
  cp "$dir/munge/munged.pid" "$dir/munged.pid"
fi

export SLURM_CONF="$conf"
slurmctld -f "$conf" -i   # -i: ignore state left by an earlier start (a fresh queue)
slurmd -f "$conf"
for _ in $(seq 100); do
  state="$(sinfo --noheader --format=%T 2>/dev/null || true)"
  case "$state" in
    idle*|mixed*|alloc*) echo "local SLURM up: node $host ($cpus CPUs, ${mem_mb} MB), partition local"
                         echo "export SLURM_CONF=$conf"; exit 0 ;;
  esac
  sleep 0.2
done
echo "setup.sh: the node did not come up (sinfo: '${state:-nothing}'); see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 4
