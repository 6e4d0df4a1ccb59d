# Shared by hack/cluster.sh and hack/real-node.sh (sourced, not run): processes started and stopped by
# PID (never by name), readiness polling, and client certificates and kubeconfigs signed by the cluster
# CA. The sourcing script sets, before it calls any of these:
#
#   PIDS     directory of the <name>.pid files
#   LOGS     directory of the <name>.log files
#   MARK     a path every one of its processes has on its command line (its state directory): a PID
#            recorded here is signalled only while its command line still holds it, so a recycled PID
#            is never touched
#   START_TIMEOUT  seconds wait_until waits
#   STOP_WAIT      seconds stop_one waits after SIGTERM before SIGKILL (default 10)
#   OURS_BY_NAME   when 1, a process is ours only if its command line also runs a binary called <name>
#
# and defines log, die, and on_start_failure <name> <why> (report, clean up, exit non-zero).

# shellcheck shell=bash

pidfile() { printf '%s/%s.pid' "$PIDS" "$1"; }

# ours <name>: print the PID recorded for <name> when that process is alive, not a zombie, and its
# command line holds $MARK.
ours() {
  local f pid cmd
  f=$(pidfile "$1")
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  [[ $cmd == *"$MARK"* ]] || return 1
  [[ ${OURS_BY_NAME:-0} != 1 || $cmd == *"/$1 "* ]] || return 1
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  printf '%s' "$pid"
}

# stop_pid <pid> <what> [seconds]: SIGTERM, wait (a zombie, our own un-reaped child, counts as
# stopped), then SIGKILL.
stop_pid() {
  local pid=$1 what=$2 wait=${3:-10} i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < wait * 10; i++)); do
    [[ -e /proc/$pid ]] || return 0
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
    sleep 0.1
  done
  log "$what (pid $pid) ignored SIGTERM for ${wait}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

# stop_one <name>: stop <name> if it is ours, and forget its PID.
stop_one() {
  local pid
  if pid=$(ours "$1"); then stop_pid "$pid" "$1" "${STOP_WAIT:-10}"; fi
  rm -f "$(pidfile "$1")"
}

# spawn <name> <argv...>: run detached (own session, output to $LOGS/<name>.log), record the PID.
spawn() {
  local name=$1; shift
  mkdir -p "$PIDS" "$LOGS"
  # 8>&-: the process must not inherit (and so hold) the caller's up/down lock.
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 8>&- &
  local pid=$! i
  echo "$pid" >"$(pidfile "$name")"
  # Until the fork execs, /proc/$pid/cmdline is this script's, and `ours` would call the process gone
  # ("exited during startup", with an empty log) on a loaded machine: wait for the exec.
  for ((i = 0; i < 200; i++)); do
    ours "$name" >/dev/null || [[ ! -e /proc/$pid ]] && return 0
    sleep 0.05
  done
}

# log_tail <name>: the last 30 lines of its log, for a report.
log_tail() {
  log "---- last 30 lines of $LOGS/$1.log ----"
  tail -n 30 "$LOGS/$1.log" >&2 2>/dev/null || true
}

# wait_until <name> <command...>: poll the command until it succeeds; on_start_failure when <name>
# exits or START_TIMEOUT passes first.
wait_until() {
  local name=$1; shift
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    ours "$name" >/dev/null || on_start_failure "$name" "exited during startup"
    ((SECONDS < deadline)) || on_start_failure "$name" "was not ready after ${START_TIMEOUT}s"
    sleep 0.2
  done
}

# client_cert <ca dir> <out prefix> <CN> <O or ""> [SANs] [days]: EC P-256 key + cert signed by the
# cluster CA in <ca dir> (fast to generate): <out prefix>.key, <out prefix>.crt.
client_cert() {
  local ca=$1 out=$2 cn=$3 org=$4 san=${5:-} days=${6:-3650} subj ext
  subj="/CN=$cn"; [[ -n $org ]] && subj="/O=$org$subj"
  openssl ecparam -name prime256v1 -genkey -noout -out "$out.key" 2>/dev/null
  openssl req -new -key "$out.key" -subj "$subj" -out "$out.csr" 2>/dev/null
  ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=${san:+serverAuth,}clientAuth"
  [[ -n $san ]] && ext+=$'\n'"subjectAltName=$san"
  openssl x509 -req -in "$out.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile <(printf '%s\n' "$ext") -out "$out.crt" 2>/dev/null
  rm -f "$out.csr"
}

# write_kubeconfig <user> <ca.crt> <client prefix> <out>: a kubeconfig for the local apiserver
# (https://127.0.0.1:$API_PORT) as <user>, with <client prefix>.crt/.key.
write_kubeconfig() {
  local user=$1 ca=$2 client=$3 out=$4
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubetune-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $ca
users:
- name: $user
  user:
    client-certificate: $client.crt
    client-key: $client.key
contexts:
- name: kubetune-local
  context: {cluster: kubetune-local, user: "$user"}
current-context: kubetune-local
EOF
}
