#!/usr/bin/env bash
# A real one-machine SLURM cluster (munge + slurmctld + slurmd) for tests, CI and trying the sbatch
# scripts without a cluster account. Run as root on a Debian/Ubuntu machine or container.
#
#   slurm/local_cluster.sh [start]   install if missing, write config, start daemons, wait for `idle`
#   slurm/local_cluster.sh status    print `sinfo`; exit 0 only if the node accepts jobs
#   slurm/local_cluster.sh stop      stop the daemons this script started (by their pid files)
#
# Idempotent: daemons that already run are kept. It refuses to overwrite a slurm.conf it did not
# write, so running it on a real cluster's login node changes nothing. Exit status 0 = ready;
# anything else comes with one line on stderr saying why (tests print it as their skip reason).
set -euo pipefail

MARKER="# written by emomae slurm/local_cluster.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
PARTITION="${EMOMAE_SLURM_PARTITION:-debug}"
NODE="$(hostname -s)"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

die() { echo "local_cluster: $*" >&2; exit 2; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

owns_config() { [ "$(id -u)" = 0 ] && [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; }

node_ready() {
  # `idle`, `mixed` or `allocated` all accept (or queue) jobs; `down`/`drain` do not.
  local state
  state="$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -n1)" || return 1
  case "$state" in idle* | mix* | alloc* | comp*) return 0 ;; *) return 1 ;; esac
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged not installed and no apt-get to install them"
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed; run as root or: apt-get install -y slurm-wlm munge"
  echo "local_cluster: installing slurm-wlm munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
    || die "apt-get install slurm-wlm munge failed (no package mirror reachable?)"
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
  fi
  local cpus mem_mb
  # Every CPU this process may run on. Plain `nproc` also honours OMP_NUM_THREADS, so a shell with
  # OMP_NUM_THREADS=1 would otherwise write a 1-CPU node and 2-task jobs would never start.
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
  # slurmd drains a node that reports less memory than configured: stay well below MemTotal.
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  local tmp
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
$MARKER
# One node that is its own controller. Settings chosen for containers without systemd or cgroups.
ClusterName=emomae-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Jobs may requeue themselves (Lightning's SIGUSR1 handler runs "scontrol requeue").
JobRequeue=1
# Preemption and time-limit kills: SIGTERM, then SIGKILL this many seconds later.
KillWait=10
# Keep finished jobs visible to "scontrol show job" for 10 minutes (no accounting database).
MinJobAge=600
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  # Rewriting an unchanged file would make a running slurmctld think the config moved under it.
  if ! cmp -s "$tmp" "$CONF"; then
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
    CONFIG_CHANGED=1
  else
    rm -f "$tmp"
  fi
  # slurmd reads cgroup.conf even with proctrack/linuxproc, and refuses `CgroupPlugin=disabled`.
  if [ ! -f "$CONF_DIR/cgroup.conf" ]; then
    printf '%s\nCgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge or run mungekey)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  die "munged started but credentials do not round-trip (munge -n | unmunge)"
}

stop_daemon() {
  pid_alive "$1" || return 0
  local pid
  pid="$(cat "$1")"
  kill "$pid"
  for _ in $(seq 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  die "$2 (pid $pid) did not stop within 10 s"
}

start_daemons() {
  # A node's CPUs or memory only change when both daemons restart (`scontrol reconfigure` keeps them);
  # jobs survive in StateSaveLocation.
  if [ "${CONFIG_CHANGED:-0}" = 1 ]; then
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
  fi
  if ! pid_alive "$CTLD_PID"; then
    /usr/sbin/slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  fi
  if ! pid_alive "$SLURMD_PID"; then
    /usr/sbin/slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
  fi
}

wait_ready() {
  for i in $(seq 60); do
    if node_ready; then
      echo "local_cluster: node $NODE ready in partition $PARTITION ($(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs)"
      return 0
    fi
    # A node left `down`/`drained` by an earlier unclean stop is fine to put back in service.
    if [ "$i" = 10 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi
    sleep 0.5
  done
  die "node $NODE not ready after 30 s: $(sinfo -h -n "$NODE" -o '%t %E' 2>&1 | head -n1)"
}

stop() {
  for f in "$SLURMD_PID" "$CTLD_PID" "$MUNGE_PID"; do
    if pid_alive "$f"; then kill "$(cat "$f")"; fi
  done
  echo "local_cluster: stopped"
}

case "${1:-start}" in
  start)
    # A cluster this script configured is brought up to date (its config may be stale); any other
    # cluster that accepts jobs is left as it is.
    if command -v sinfo >/dev/null && node_ready && ! owns_config; then
      echo "local_cluster: node $NODE already up"
      exit 0
    fi
    install_packages
    [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd needs root (this script configures SlurmUser=root)"
    write_config
    start_munge
    start_daemons
    wait_ready
    ;;
  status)
    sinfo
    node_ready
    ;;
  stop) stop ;;
  *) die "unknown command ${1}; expected start, status or stop" ;;
esac
