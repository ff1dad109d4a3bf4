#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests (tests/test_slurm_real.py) and for trying the profile.
#
#   tests/slurm/local_slurm.sh install   # apt-get slurm-wlm + munge (root; ~10-60 s); a no-op when installed
#   tests/slurm/local_slurm.sh start     # write slurm.conf/gres.conf for this host, start munged, slurmctld, slurmd
#   tests/slurm/local_slurm.sh stop      # stop the three daemons by their pid files
#   tests/slurm/local_slurm.sh status    # exit 0 when the node answers and is idle/mixed/allocated
#
# The node has every core and most of the memory of this machine, two `gpu` GRES backed by /dev/null and /dev/zero
# (so `--gpus=1` jobs are accepted; torch sees no CUDA device in them), and two partitions, `cpu` (default) and `gpu`. No
# accounting database: the profile's status command is squeue (MinJobAge=3600 keeps finished jobs visible to it and to
# the tests' `scontrol show job`),
# and `--slurm-no-account` is passed. KillWait=10 s: a job past its time limit gets SIGTERM, then SIGKILL 10 s later.
# Debian 12 packages (slurm-wlm 22.05); no systemd: the daemons are started directly. Everything it writes is under
# /etc/slurm, /run/{munge,slurm}, /var/spool/slurm{ctld,d} and /var/log/slurm.
set -euo pipefail

CONF=/etc/slurm
HOST=$(hostname -s)

need_root() { [ "$(id -u)" = 0 ] || { echo "local_slurm: needs root (apt-get, daemons)" >&2; exit 2; }; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  need_root
  command -v apt-get >/dev/null || { echo "local_slurm: no apt-get on this machine" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; }
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))
  mkdir -p "$CONF"
  cat > "$CONF/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
OverTimeLimit=0
NodeName=$HOST CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
  # Two "GPUs" on character devices that exist everywhere (`Count=` without File= drains the node: "gres/gpu count
  # reported lower than configured"), so two single-GPU jobs can run at once on the two cores
  printf 'NodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n' "$HOST" "$HOST" > "$CONF/gres.conf"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  need_root
  install
  write_conf
  mkdir -p /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null;
                                   chown munge: /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  chown munge: /run/munge
  pid_alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  pid_alive /run/slurm/slurmctld.pid || slurmctld
  pid_alive /run/slurm/slurmd.pid || slurmd
  for _ in $(seq 60); do
    if status; then return 0; fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_slurm: the node did not come up in 60 s; see /var/log/slurm/slurmctld.log and slurmd.log:" >&2
  sinfo -N -o '%N %T %E' >&2 || true
  tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
}

status() {
  local state
  state=$(timeout 10 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -1) || return 1
  case "$state" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

stop() {
  local f
  for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  for _ in $(seq 20); do
    pid_alive /run/slurm/slurmd.pid || pid_alive /run/slurm/slurmctld.pid || return 0
    sleep 0.5
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
