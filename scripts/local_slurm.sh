#!/usr/bin/env bash
# local_slurm.sh - a real, throw-away, ONE-node Slurm cluster on this machine.
#
# Used by metatrain's integration tests (see tests/slurm_cluster.py) and by
# users who want to try `hydra/launcher=slurm` without a real cluster.
#
# Usage:
#   scripts/local_slurm.sh install   # apt-get install slurm-wlm + munge (no-op if present)
#   scripts/local_slurm.sh start     # write config, start munged/slurmctld/slurmd, wait for idle node
#   scripts/local_slurm.sh stop      # cancel jobs, stop exactly the daemons `start` recorded
#   scripts/local_slurm.sh status    # show recorded daemons and `sinfo` (exit 0 ok, 1 broken, 3 stopped)
#   scripts/local_slurm.sh restart   # stop + start
#   scripts/local_slurm.sh env       # print the `export ...` lines clients need
#
# After `start`, point the Slurm client tools (sbatch, srun, squeue, scontrol,
# and therefore submitit / hydra-submitit-launcher) at the cluster with
#   source "$METATRAIN_SLURM_DIR/env"        # sets SLURM_CONF (+ PATH, see below)
# or start and set the variables in one go:  eval "$(scripts/local_slurm.sh start)"
#
# Everything lives under one state dir (nothing is written to /etc):
#   $METATRAIN_SLURM_DIR (default /tmp/metatrain-slurm)
#     env                    export lines (SLURM_CONF, METATRAIN_SLURM_DIR, PATH)
#     etc/slurm.conf         the generated config (SLURM_CONF points here)
#     etc/plugstack.conf     empty (keeps Slurm away from /etc/slurm/plugstack.conf)
#     munge/                 private munged socket (world-searchable, munged insists)
#     munge-key/munge.key    private munge key (0400, dir 0700)
#     pids/<daemon>.pid      pids recorded by `start`; `stop` kills exactly these
#     log/*.log              munged / slurmctld / slurmd logs
#     ctld/ spool/           StateSaveLocation / SlurmdSpoolDir
#     bin/sacct              a tiny sacct stand-in (see "sacct shim" below)
#
# Environment knobs (all optional):
#   METATRAIN_SLURM_DIR            state dir (default /tmp/metatrain-slurm)
#   METATRAIN_SLURM_CPUS           CPUs to advertise (default: what `slurmd -C` reports;
#                                  a larger value is allowed: SlurmdParameters=config_overrides)
#   METATRAIN_SLURM_MEM_MB         RealMemory to advertise (default: `slurmd -C`)
#   METATRAIN_SLURM_PORT           SlurmctldPort; SlurmdPort = this + 1
#                                  (default: first free pair from 16817 upwards)
#   METATRAIN_SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default 90)
#   METATRAIN_SLURM_SACCT_SHIM     1 (default) / 0: install bin/sacct and put it on PATH
#   METATRAIN_SLURM_CRED_EXPIRE    AuthInfo cred_expire in s (default 10, min 5). A job
#                                  requeued with `scontrol requeue` stays PENDING
#                                  (Reason=BeginTime) for cred_expire+1 s before it reruns.
#
# sacct shim: this cluster has no accounting database (AccountingStorageType=
# accounting_storage/none), so the real `sacct` only prints an error.  submitit
# polls `sacct -o JobID,State,NodeList --parsable2 -j <id>` to notice jobs that
# died WITHOUT writing a result (scancel, OOM kill, ...); without an answer it
# waits forever.  bin/sacct answers that query from `squeue -t all` (the
# controller remembers finished jobs for MinJobAge=3600 s).  It only implements
# what submitit needs; set METATRAIN_SLURM_SACCT_SHIM=0 to leave PATH alone.
set -euo pipefail

PATH="$PATH:/usr/sbin:/sbin"
export PATH

PROG="local_slurm.sh"
STATE_DIR="${METATRAIN_SLURM_DIR:-/tmp/metatrain-slurm}"
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$PWD/$STATE_DIR" ;; esac
STATE_DIR="${STATE_DIR%/}"

CONF="$STATE_DIR/etc/slurm.conf"
PIDS="$STATE_DIR/pids"
LOGS="$STATE_DIR/log"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"
MUNGE_KEY="$STATE_DIR/munge-key/munge.key"
ENV_FILE="$STATE_DIR/env"
START_TIMEOUT="${METATRAIN_SLURM_START_TIMEOUT:-90}"
SACCT_SHIM="${METATRAIN_SLURM_SACCT_SHIM:-1}"
CRED_EXPIRE="${METATRAIN_SLURM_CRED_EXPIRE:-10}"

# daemons in start order; stop goes in reverse
DAEMONS=(munged slurmctld slurmscriptd slurmd)
REQUIRED_BINS=(munged slurmctld slurmd sbatch srun squeue sinfo scontrol scancel)

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
}

missing_bins() {
    local b out=()
    for b in "${REQUIRED_BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || out+=("$b")
    done
    echo "${out[*]:-}"
}

# ---------------------------------------------------------------- install
cmd_install() {
    local missing
    missing="$(missing_bins)"
    if [[ -z "$missing" ]]; then
        log "slurm and munge already installed ($(slurmd -V 2>/dev/null || echo '?'), $(munged --version 2>/dev/null | head -1 || echo '?'))"
        return 0
    fi
    log "missing: $missing -> installing slurm-wlm and munge with apt-get"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install Slurm (slurmctld, slurmd, client tools) and munge by hand"
    local SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to apt-get install"
        SUDO=(sudo)
    fi
    local t0=$SECONDS
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        slurm-wlm munge
    missing="$(missing_bins)"
    [[ -z "$missing" ]] || die "still missing after install: $missing"
    log "installed in $((SECONDS - t0)) s: $(slurmd -V)"
    log "(the distro's own slurmctld/slurmd/munge services are not used by this script;"
    log " they fail or idle without /etc/slurm/slurm.conf, and we use other ports/sockets)"
}

# ---------------------------------------------------------------- pid helpers
pid_file() { echo "$PIDS/$1.pid"; }

# read the recorded pid of a daemon ("" if none)
recorded_pid() {
    local f
    f="$(pid_file "$1")"
    if [[ -s "$f" ]]; then tr -dc '0-9' <"$f"; fi
}

# is <pid> alive AND still the daemon <name>? (guards against pid reuse)
pid_is() {
    local pid="$1" name="$2" comm
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    # zombies are gone for our purposes
    if [[ -r "/proc/$pid/stat" ]]; then
        local st
        st="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null || true)"
        [[ "$st" == "Z" || "$st" == "X" ]] && return 1
    fi
    [[ "$comm" == "$name" ]]
}

daemon_alive() { pid_is "$(recorded_pid "$1")" "$1"; }

# children of <ppid> whose comm is <name>
child_pids() {
    local ppid="$1" name="$2" d pid stat st parent
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        stat="$(cat "$d/stat" 2>/dev/null)" || continue
        # fields after the ")" of the comm: state ppid ...
        read -r st parent _ <<<"${stat##*) }"
        [[ "$parent" == "$ppid" ]] || continue
        [[ "$(cat "$d/comm" 2>/dev/null)" == "$name" ]] && echo "$pid"
    done
    return 0
}

any_alive() {
    local d
    for d in "${DAEMONS[@]}"; do daemon_alive "$d" && return 0; done
    return 1
}

all_alive() {
    local d
    for d in munged slurmctld slurmd; do daemon_alive "$d" || return 1; done
    return 0
}

# ---------------------------------------------------------------- ports
port_in_use() {
    local hex
    hex="$(printf '%04X' "$1")"
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        awk -v p=":$hex" 'NR>0 && $2 ~ p"$" && $4 == "0A" {f=1} END {exit !f}'
}

pick_ports() {
    if [[ -n "${METATRAIN_SLURM_PORT:-}" ]]; then
        CTLD_PORT="$METATRAIN_SLURM_PORT"
        SLURMD_PORT=$((CTLD_PORT + 1))
        return
    fi
    local p
    for ((p = 16817; p < 16817 + 200; p += 2)); do
        if ! port_in_use "$p" && ! port_in_use $((p + 1)); then
            CTLD_PORT=$p
            SLURMD_PORT=$((p + 1))
            return
        fi
    done
    die "no free port pair in 16817-17017; set METATRAIN_SLURM_PORT"
}

# ---------------------------------------------------------------- env file
write_env() {
    {
        echo "# generated by $PROG start; source this file to use the local cluster"
        echo "export METATRAIN_SLURM_DIR='$STATE_DIR'"
        echo "export SLURM_CONF='$CONF'"
        if [[ "$SACCT_SHIM" == 1 ]]; then
            echo "export PATH='$STATE_DIR/bin':\"\${PATH}\""
        fi
    } >"$ENV_FILE"
}

# stdout gets only the export lines, so `eval "$(scripts/local_slurm.sh start)"` works
print_env_hint() {
    log "cluster env: source $ENV_FILE   (or at least: export SLURM_CONF=$CONF)"
    grep '^export ' "$ENV_FILE"
}

cmd_env() {
    [[ -f "$ENV_FILE" ]] || die "no $ENV_FILE; run '$PROG start' first"
    cat "$ENV_FILE"
}

# ---------------------------------------------------------------- config
write_sacct_shim() {
    mkdir -p "$STATE_DIR/bin"
    cat >"$STATE_DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in for a Slurm cluster without accounting (written by local_slurm.sh).
# Answers what submitit asks: sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
# from the controller's memory (squeue -t all; finished jobs stay for MinJobAge).
set -uo pipefail
ids=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -j|--jobs) ids+=("${2//,/ }"); shift 2 ;;
        -j*) ids+=("${1#-j}"); shift ;;
        --jobs=*) ids+=("${1#--jobs=}"); shift ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
for id in ${ids[@]+"${ids[@]}"}; do
    squeue -h -r -t all -j "$id" -o '%i|%T|%N' 2>/dev/null || true
done
exit 0
EOF
    chmod 755 "$STATE_DIR/bin/sacct"
}

write_config() {
    local node cpus mem hw hw_cpus hw_mem user overrides=""
    node="$(hostname -s)"
    hw="$(slurmd -C 2>/dev/null | head -1)" || true
    hw_cpus="$(sed -nE 's/.* CPUs=([0-9]+).*/\1/p' <<<"$hw")"
    hw_mem="$(sed -nE 's/.* RealMemory=([0-9]+).*/\1/p' <<<"$hw")"
    [[ -n "$hw_cpus" ]] || hw_cpus="$(nproc)"
    [[ -n "$hw_mem" ]] || hw_mem="$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
    cpus="${METATRAIN_SLURM_CPUS:-$hw_cpus}"
    mem="${METATRAIN_SLURM_MEM_MB:-$hw_mem}"
    local topo="CPUs=${cpus}"
    if ((cpus > hw_cpus || mem > hw_mem)); then
        overrides="SlurmdParameters=config_overrides"
    elif ((cpus == hw_cpus)); then
        # the full hardware layout avoids "Node reconfigured socket/core boundaries" noise
        topo="$(grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$hw" | tr '\n' ' ')"
        [[ "$topo" == *CPUs=* ]] || topo="CPUs=${cpus}"
    fi
    # default memory for jobs that do not ask (otherwise CR_*_Memory gives them the whole node)
    local def_mem=$((mem / cpus))
    ((def_mem > 1024)) && def_mem=1024
    user="$(id -un)"
    local addr="127.0.0.1"

    cat >"$CONF" <<EOF
# generated by $PROG on $(date -Is) -- one-node test cluster, do not use in production
ClusterName=metatrain-local
SlurmctldHost=${node}(${addr})
SlurmUser=${user}
SlurmdUser=${user}
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}

AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued batch job is held (Reason=BeginTime) for cred_expire+1 s
# (Slurm default 120 -> 121 s); keep it short so requeue tests are quick.
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=${CRED_EXPIRE}
MailProg=/bin/true

StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/run/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/run/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=${STATE_DIR}/etc/plugstack.conf

# no cgroups, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${def_mem}
${overrides}

# requeue support: batch jobs are requeueable by default
JobRequeue=1
ReturnToService=2
# keep finished jobs visible (squeue -t all / bin/sacct) for an hour
MinJobAge=3600
MaxJobCount=100000

# short timeouts for a quick start-up / shutdown / requeue
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
TCPTimeout=2
KillWait=5
InactiveLimit=0
Waittime=0
BatchStartTimeout=10
UnkillableStepTimeout=30

NodeName=${node} NodeAddr=${addr} ${topo% } RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    : >"$STATE_DIR/etc/plugstack.conf"
    NODE="$node"
}

# ---------------------------------------------------------------- start
# start <name> <cmd...> in the foreground (as a child of a new session), logs to log/<name>.out
spawn() {
    local name="$1"; shift
    # setsid: own session, so a Ctrl-C / SIGHUP to the caller does not reach the daemon.
    # stdin/stdout/stderr -> files so that a caller capturing our output is not held open.
    # 9>&-: do not let the daemon inherit (and hold forever) our flock on .lock.
    setsid "$@" </dev/null >>"$LOGS/$name.out" 2>&1 9>&- &
    local pid=$!
    echo "$pid" >"$(pid_file "$name")"
}

# If $! was not the daemon itself (e.g. setsid had to fork), take the pid the
# daemon wrote to its own pid file (run/<name>.pid) when that one is alive.
adopt_own_pidfile() {
    local name="$1" own
    own="$(tr -dc '0-9' <"$STATE_DIR/run/$name.pid" 2>/dev/null || true)"
    if [[ -n "$own" && "$own" != "$(recorded_pid "$name")" ]] && pid_is "$own" "$name"; then
        echo "$own" >"$(pid_file "$name")"
    fi
}

# wait (up to <secs>) for <cmd...> to succeed; fail early if daemon <name> died
wait_for() {
    local what="$1" name="$2" secs="$3"; shift 3
    local deadline=$((SECONDS + secs))
    while ! "$@" >/dev/null 2>&1; do
        daemon_alive "$name" || adopt_own_pidfile "$name"
        if ! daemon_alive "$name"; then
            start_failed "$name died while waiting for: $what"
        fi
        ((SECONDS < deadline)) || start_failed "timed out after ${secs}s waiting for: $what"
        sleep 0.5
    done
}

start_failed() {
    log "start FAILED: $*"
    local f
    for f in "$LOGS"/*.out "$LOGS"/*.log; do
        [[ -s "$f" ]] || continue
        log "---- tail $f"
        tail -n 15 "$f" >&2 || true
    done
    log "stopping what was started"
    stop_daemons || true
    exit 1
}

munge_ok() {
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"
}

ctld_up() {
    scontrol ping | grep -q 'is UP'
}

node_ready() {
    local st
    st="$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1)"
    [[ "$st" == idle* || "$st" == mix* || "$st" == alloc* ]]
}

cmd_start() {
    local missing
    missing="$(missing_bins)"
    [[ -z "$missing" ]] || die "missing binaries: $missing (run '$0 install')"

    # unix socket paths are limited to 107 bytes: the munge socket and slurmd's
    # step sockets <SlurmdSpoolDir>/<node>_<jobid>.<stepid> live in the state dir
    local longest
    longest="$STATE_DIR/spool/$(hostname -s)_4294967295.4294967295"
    if ((${#longest} > 107)); then
        die "state dir path too long for unix sockets ($longest is ${#longest} > 107 chars);" \
            "use a shorter METATRAIN_SLURM_DIR (e.g. under /tmp)"
    fi
    mkdir -p "$STATE_DIR"
    if all_alive; then
        log "already running (state dir $STATE_DIR); nothing to do"
        write_env
        print_env_hint
        return 0
    fi
    if any_alive; then
        log "partially running (some daemons died); restarting"
        stop_daemons
    fi

    local t0=$SECONDS
    # munged wants the socket dir (and its parents) searchable by everyone,
    # and the key dir private.
    chmod 755 "$STATE_DIR"
    mkdir -p "$STATE_DIR/etc" "$STATE_DIR/munge" "$STATE_DIR/munge-key" "$PIDS" \
        "$LOGS" "$STATE_DIR/ctld" "$STATE_DIR/spool" "$STATE_DIR/run"
    chmod 755 "$STATE_DIR/munge"
    chmod 700 "$STATE_DIR/munge-key" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    chmod 755 "$LOGS"
    rm -f "$PIDS"/*.pid "$STATE_DIR"/run/*.pid "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    if [[ ! -s "$MUNGE_KEY" ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chmod 400 "$MUNGE_KEY"

    pick_ports
    write_config
    [[ "$SACCT_SHIM" == 1 ]] && write_sacct_shim
    write_env
    export SLURM_CONF="$CONF"

    local d
    # 1. munged (private key + socket)
    spawn munged munged --foreground --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$STATE_DIR/run/munged.pid" --log-file="$LOGS/munged.log" \
        --seed-file="$STATE_DIR/munge-key/munged.seed"
    wait_for "munged answers on $MUNGE_SOCKET" munged 20 munge_ok

    # 2. slurmctld (-D foreground, -i ignore unreadable state); it forks slurmscriptd
    spawn slurmctld slurmctld -D -i -f "$CONF"
    wait_for "slurmctld answers 'scontrol ping'" slurmctld 30 ctld_up
    local ctld scriptd
    ctld="$(recorded_pid slurmctld)"
    scriptd="$(child_pids "$ctld" slurmscriptd | head -1)"
    if [[ -n "$scriptd" ]]; then
        echo "$scriptd" >"$(pid_file slurmscriptd)"
    fi

    # 3. slurmd
    spawn slurmd slurmd -D -f "$CONF"
    wait_for "node $NODE idle in sinfo" slurmd "$START_TIMEOUT" node_ready
    for d in munged slurmctld slurmd; do adopt_own_pidfile "$d"; done

    for d in "${DAEMONS[@]}"; do
        if [[ -s "$(pid_file "$d")" ]]; then log "  $d pid $(recorded_pid "$d")"; fi
    done
    log "started in $((SECONDS - t0)) s: node $NODE ($(sinfo -h -n "$NODE" -o '%c CPUs, %m MB, state %t'))," \
        "partition debug, ports $CTLD_PORT/$SLURMD_PORT, state dir $STATE_DIR"
    print_env_hint
}

# ---------------------------------------------------------------- stop
cancel_jobs() {
    export SLURM_CONF="$CONF"
    daemon_alive slurmctld || return 0
    local jobs=()
    # ids such as 12_[3-5] must not be glob-expanded: read them into an array
    mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null || true)
    ((${#jobs[@]} > 0)) || return 0
    log "cancelling jobs: ${jobs[*]}"
    scancel --full "${jobs[@]}" 2>/dev/null || true
    # scancel only signals; wait for the steps (slurmstepd, not recorded) to finish
    local deadline=$((SECONDS + 30)) left
    while ((SECONDS < deadline)); do
        left="$(squeue -h -o '%i' 2>/dev/null | tr -d '\n')" || break
        [[ -z "$left" ]] && return 0
        sleep 0.5
    done
    log "warning: jobs still listed after 30 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

# wait up to <secs> for daemon <name> (pid <pid>) to exit; 0 if it did
wait_gone() {
    local pid="$1" name="$2" secs="$3"
    local deadline=$((SECONDS + secs))
    while pid_is "$pid" "$name"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    return 0
}

# stop_one <name> [signal]: signal the recorded pid (unless signal is "none",
# i.e. the daemon is stopped by its parent), wait, SIGKILL after 20 s.
stop_one() {
    local name="$1" sig="${2:-TERM}" pid
    pid="$(recorded_pid "$name")"
    if [[ -z "$pid" ]]; then
        return 0
    fi
    if ! pid_is "$pid" "$name"; then
        rm -f "$(pid_file "$name")"
        return 0
    fi
    [[ "$sig" == none ]] || kill -"$sig" "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$name" 20; then
        log "$name (pid $pid) still running 20 s after SIG$sig; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" "$name" 10; then
            log "ERROR: $name (pid $pid) survived SIGKILL"
            return 1
        fi
    fi
    log "stopped $name (pid $pid)"
    rm -f "$(pid_file "$name")"
}

stop_daemons() {
    local rc=0
    stop_one slurmd || rc=1
    # slurmctld stops its own slurmscriptd; killing slurmscriptd first makes
    # slurmctld hang in its shutdown, so only wait for it (SIGKILL as last resort)
    stop_one slurmctld || rc=1
    stop_one slurmscriptd none || rc=1
    stop_one munged || rc=1
    return $rc
}

cmd_stop() {
    if [[ ! -d "$PIDS" ]] || ! any_alive; then
        log "not running (state dir $STATE_DIR)"
        rm -f "$PIDS"/*.pid 2>/dev/null || true
        return 0
    fi
    local t0=$SECONDS
    cancel_jobs
    stop_daemons || die "some daemons could not be stopped"
    log "stopped in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- status
cmd_status() {
    local d pid rc=0 n=0
    for d in "${DAEMONS[@]}"; do
        pid="$(recorded_pid "$d")"
        if [[ -z "$pid" ]]; then
            [[ "$d" == slurmscriptd ]] || echo "$d: not started"
        elif pid_is "$pid" "$d"; then
            echo "$d: running (pid $pid)"
            ((n += 1))
        else
            echo "$d: DEAD (recorded pid $pid)"
            rc=1
        fi
    done
    if all_alive; then
        export SLURM_CONF="$CONF"
        sinfo || rc=1
        squeue || true
        echo "export SLURM_CONF=$CONF"
        return $rc
    fi
    ((n == 0)) && { echo "not running (state dir $STATE_DIR)"; return 3; }
    return 1
}

# ---------------------------------------------------------------- main
with_lock() {
    mkdir -p "$STATE_DIR"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$STATE_DIR/.lock"
        flock -w 120 9 || die "could not lock $STATE_DIR/.lock"
    fi
    "$@"
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        install) cmd_install ;;
        start) with_lock cmd_start ;;
        stop) with_lock cmd_stop ;;
        restart) with_lock cmd_stop; with_lock cmd_start ;;
        status) cmd_status ;;
        env) cmd_env ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
