#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 with kwok fake nodes: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and the kwok controller, each a plain process started from
# the pinned binaries that hack/build-binaries.sh builds. See docs/cluster.md.
#
#   hack/cluster.sh up       start (no-op when already healthy; cleans up after a crash), print KUBECONFIG
#   hack/cluster.sh down     stop every process by PID (TERM, then KILL) and delete the state directory
#   hack/cluster.sh status   exit 0 when every component runs and the apiserver is ready
#   hack/cluster.sh apiserver stop|start   stop or start only the apiserver (a test hook for watch gaps)
#   hack/cluster.sh kueue up|down|status    start Kueue's manager on a running cluster (its CRDs and
#                            webhooks too), or stop it; `up` starts it itself when KUBETUNE_KUEUE=1
#
# Environment (all optional):
#   KUBETUNE_CLUSTER_DIR        state directory (default <repo>/.cluster): certs, kubeconfig, logs, pids
#   KUBETUNE_APISERVER_PORT     kube-apiserver port (default 6443)
#   KUBETUNE_PORT_BASE          first of 8 consecutive ports for etcd client/peer, controller-manager,
#                               scheduler, kwok and Kueue's webhook/metrics/health (default 23790). Keep all ports below the ephemeral
#                               range (/proc/sys/net/ipv4/ip_local_port_range, usually 32768+): a port
#                               there can be taken by any outgoing connection.
#   KUBETUNE_BIN_DIR            binaries (default ${XDG_CACHE_HOME:-~/.cache}/kubetune/bin/current)
#   KUBETUNE_EXTRA_ARGS_<C>     extra flags for component C (ETCD, KUBE_APISERVER,
#                               KUBE_CONTROLLER_MANAGER, KUBE_SCHEDULER, KWOK); a test hook
#   KUBETUNE_START_TIMEOUT      seconds to wait for each component (default 60)
#   KUBETUNE_KUEUE_PODS_READY_TIMEOUT, KUBETUNE_KUEUE_REQUEUE_BASE_SECONDS   Kueue's waitForPodsReady
#                               timeout (default 5m) and requeuing backoff base (default 60); a running
#                               Kueue with other values is restarted by `kueue up`
set -euo pipefail
shopt -s inherit_errexit

HACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HACK")
DIR=$(realpath -m "${KUBETUNE_CLUSTER_DIR:-$REPO/.cluster}")
BIN=${KUBETUNE_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/bin/current}
API_PORT=${KUBETUNE_APISERVER_PORT:-6443}
BASE=${KUBETUNE_PORT_BASE:-23790}
ETCD_PORT=$BASE ETCD_PEER_PORT=$((BASE + 1)) KCM_PORT=$((BASE + 2)) SCHED_PORT=$((BASE + 3))
KWOK_PORT=$((BASE + 4))
KUEUE_WEBHOOK_PORT=$((BASE + 5)) KUEUE_METRICS_PORT=$((BASE + 6)) KUEUE_HEALTH_PORT=$((BASE + 7))
START_TIMEOUT=${KUBETUNE_START_TIMEOUT:-60}
# Kueue's waitForPodsReady: an admitted Workload whose pods are not all Ready within the timeout is
# evicted and requeued after an exponential backoff from the base.
KUEUE_PODS_READY_TIMEOUT=${KUBETUNE_KUEUE_PODS_READY_TIMEOUT:-5m}
KUEUE_REQUEUE_BASE_SECONDS=${KUBETUNE_KUEUE_REQUEUE_BASE_SECONDS:-60}
SERVICE_CIDR=10.96.0.0/16
# Stop order; start order is the reverse.
COMPONENTS=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes (by PID, never by name)

# hack/lib.sh: ours, stop_one, spawn, wait_until, client_cert, write_kubeconfig. A component is ours when
# its command line runs $BIN/<component> and names this state directory.
PIDS=$DIR/pids LOGS=$DIR/logs MARK=$DIR OURS_BY_NAME=1
# shellcheck source=hack/lib.sh
source "$HACK/lib.sh"

stop_all() {
  local c
  for c in kueue "${COMPONENTS[@]}"; do stop_one "$c"; done
}

# A port is busy when something listens on it, or when any socket other than a TIME-WAIT one uses it
# locally (e.g. an outgoing connection that got it as its ephemeral port: bind would fail).
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
  command -v ss >/dev/null && [[ -n $(ss -Htan "( sport = :$1 )" | grep -v TIME-WAIT) ]]
}

# fail <component> <why>: report a component that did not come up, with the tail of its log.
fail() {
  local c=$1 why=$2
  log "error: $c $why"
  log_tail "$c"
  log "---- (stopping the components already started)"
  stop_all
  exit 1
}
on_start_failure() { fail "$@"; }

# start <component> <args...>: run $BIN/<component> detached, with KUBETUNE_EXTRA_ARGS_<COMPONENT>.
start() {
  local c=$1; shift
  local var="KUBETUNE_EXTRA_ARGS_${c^^}"; var=${var//-/_}
  local -a extra=()
  read -r -a extra <<<"${!var:-}"
  [[ -x $BIN/$c ]] || die "$BIN/$c is missing: run 'bash hack/build-binaries.sh' (or make setup)"
  spawn "$c" "$BIN/$c" "$@" "${extra[@]}"
}

# ---------------------------------------------------------------- certificates and kubeconfigs

PKI=$DIR/pki
KUBECONFIG_PATH=$DIR/kubeconfig

# cert <name> <CN> <O or ""> [SANs]: a key and cert in $PKI signed by the cluster CA.
cert() { client_cert "$PKI" "$PKI/$1" "$2" "$3" "${4:-}"; }

# kubeconfig <user> <out>: for the client cert $PKI/<user>.crt.
kubeconfig() { write_kubeconfig "$1" "$PKI/ca.crt" "$PKI/$1" "$2"; }

gen_pki() {
  mkdir -p "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=kubetune-local-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin kubernetes-admin system:masters
  cert kube-controller-manager system:kube-controller-manager ""
  cert kube-scheduler system:kube-scheduler ""
  # kwok plays every fake node's kubelet (node status, leases, pod status), so it gets admin rights.
  cert kwok kwok-controller system:masters
  # Service-account token signing key (ES256).
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null
  openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  kubeconfig admin "$KUBECONFIG_PATH"
  local c
  for c in kube-controller-manager kube-scheduler kwok; do kubeconfig "$c" "$DIR/$c.kubeconfig"; done
}

# ---------------------------------------------------------------- health checks

readyz() {
  curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz" | grep -qx ok
}
etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
# controller-manager and scheduler allow anonymous /healthz by default.
healthz() { curl -skf --max-time 2 "https://127.0.0.1:$1/healthz" | grep -qx ok; }
kwok_healthy() {
  curl -sf --max-time 2 "http://127.0.0.1:$KWOK_PORT/healthz" >/dev/null ||
    curl -skf --max-time 2 "https://127.0.0.1:$KWOK_PORT/healthz" >/dev/null
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do ours "$c" >/dev/null || return 1; done
}

# $DIR/ready is written as the very last step of `up`, so a half-started cluster never counts as up.
healthy() { [[ -f $DIR/ready && -f $KUBECONFIG_PATH ]] && all_running && readyz; }

# Every kwok node Ready and without the not-ready taint (removed by the node lifecycle controller), so
# the first pod a test creates schedules at once.
nodes_ready() {
  local want got
  want=$(grep -c '^kind: Node' "$HACK/k8s/nodes.yaml")
  got=$(kc get nodes -l kubetune.io/node-kind=kwok -o \
    'jsonpath={range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints[*].key}{"\n"}{end}' |
    awk '$2 == "True" && $0 !~ /node.kubernetes.io\/not-ready/' | wc -l)
  ((got >= want))
}

# ---------------------------------------------------------------- commands

# The real node (kubelet + containerd, hack/real-node.sh): started when KUBETUNE_REAL_NODE=1, always
# stopped by `down` (a no-op when it never ran).
real_node() {
  [[ $1 == down || ${KUBETUNE_REAL_NODE:-0} == 1 ]] || return 0
  KUBETUNE_CLUSTER_DIR=$DIR bash "$HACK/real-node.sh" "$1"
}

# The apiserver alone: `up` starts it, and `apiserver stop|start` (a test hook) makes a watch gap.
start_apiserver() {
  # A real kubelet reports its node name as a Hostname address, which does not resolve here.
  [[ ${KUBETUNE_REAL_NODE:-0} != 1 ]] ||
    local KUBETUNE_EXTRA_ARGS_KUBE_APISERVER="--kubelet-preferred-address-types=InternalIP,Hostname ${KUBETUNE_EXTRA_ARGS_KUBE_APISERVER:-}"
  start kube-apiserver \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,Priority,PodSecurity,NodeRestriction,TaintNodesByCondition,ResourceQuota,StorageObjectInUseProtection,PersistentVolumeClaimResize,RuntimeClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy \
    --allow-privileged=true --profiling=false --event-ttl 1h --v 1
  wait_until kube-apiserver readyz
}

# Kueue (sigs.k8s.io/kueue's manager, hack/build-binaries.sh): a host process like the others. Its
# webhooks (conversion and admission, Kueue's own API group only) reach it by url with our CA; see
# hack/kueue_manifests.py. It runs as a system:masters client, as kwok does.
kueue_ready() {
  curl -sf --max-time 2 "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null &&
    # the admission webhook answers (a server-side dry run goes through it)
    kc create --dry-run=server -f - <<<'{"apiVersion":"kueue.x-k8s.io/v1beta2","kind":"ResourceFlavor","metadata":{"name":"kubetune-probe"}}'
}

# With its internal cert management off, Kueue's manager reads its metrics serving certificate from the
# fixed path its Deployment mounts (cmd/kueue/main.go: /etc/kueue/metrics/certs). Written once, atomically
# (a directory rename), never overwritten, so clusters started side by side never see half a pair.
KUEUE_METRICS_CERTS=/etc/kueue/metrics/certs
kueue_metrics_cert() {
  [[ -f $KUEUE_METRICS_CERTS/tls.crt && -f $KUEUE_METRICS_CERTS/tls.key ]] && return 0
  mkdir -p "$(dirname "$KUEUE_METRICS_CERTS")" 2>/dev/null ||
    die "kueue needs $KUEUE_METRICS_CERTS (its metrics certificate); run as root or create it"
  local tmp; tmp=$(mktemp -d "$(dirname "$KUEUE_METRICS_CERTS")/.certs.XXXXXX")
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=kueue-metrics" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
  chmod 755 "$tmp"
  mv -T "$tmp" "$KUEUE_METRICS_CERTS" 2>/dev/null || rm -rf "$tmp"  # another cluster won the race
}

kueue_config() {
  local k=$1
  cat <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: 127.0.0.1:$KUEUE_METRICS_PORT
webhook:
  host: 127.0.0.1
  port: $KUEUE_WEBHOOK_PORT
  certDir: $k/certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
integrations:
  frameworks: []
  externalFrameworks:
  - FineTuneJob.v1alpha1.kubetune.io
waitForPodsReady:
  timeout: $KUEUE_PODS_READY_TIMEOUT
  requeuingStrategy:
    backoffBaseSeconds: $KUEUE_REQUEUE_BASE_SECONDS
EOF
}

kueue_up() {
  local k=$DIR/kueue
  if ours kueue >/dev/null; then
    if [[ "$(kueue_config "$k")" == "$(cat "$k/config.yaml" 2>/dev/null)" ]]; then
      log "kueue already running"; return 0
    fi
    log "kueue runs with another configuration: restarting it"
    stop_one kueue
  fi
  [[ -x $BIN/kueue && -f $BIN/kueue-manifests/webhook.yaml ]] ||
    die "$BIN/kueue is missing: run 'KUBETUNE_BUILD_ONLY=kueue bash hack/build-binaries.sh' (or make setup)"
  local py=$REPO/.venv/bin/python p
  [[ -x $py ]] || die "$py is missing: run make setup"
  for p in $KUEUE_WEBHOOK_PORT $KUEUE_METRICS_PORT $KUEUE_HEALTH_PORT; do
    port_busy "$p" && die "kueue cannot start: port 127.0.0.1:$p is in use (set KUBETUNE_PORT_BASE)"
  done
  mkdir -p "$k/certs"
  [[ -f $PKI/kueue.crt ]] || { cert kueue kueue-controller system:masters; kubeconfig kueue "$DIR/kueue.kubeconfig"; }
  [[ -f $PKI/kueue-webhook.crt ]] || cert kueue-webhook kueue-webhook "" "IP:127.0.0.1,DNS:localhost"
  cp "$PKI/kueue-webhook.crt" "$k/certs/tls.crt" && cp "$PKI/kueue-webhook.key" "$k/certs/tls.key"
  kueue_metrics_cert
  kueue_config "$k" >"$k/config.yaml"
  "$py" "$HACK/kueue_manifests.py" "$BIN/kueue-manifests/crd" "$BIN/kueue-manifests/webhook.yaml" \
    "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" "$PKI/ca.crt" >"$k/manifests.yaml"
  kc create namespace kueue-system --dry-run=client -o yaml | kc apply -f - >/dev/null
  kc apply --server-side --force-conflicts -f "$k/manifests.yaml" >/dev/null
  kc wait --for condition=Established --timeout 60s crd -l '!kubetune.io/none' >/dev/null
  start kueue --config "$k/config.yaml" --kubeconfig "$DIR/kueue.kubeconfig" \
    --feature-gates VisibilityOnDemand=false --zap-log-level 2
  wait_until kueue kueue_ready
  log "kueue up: webhooks https://127.0.0.1:$KUEUE_WEBHOOK_PORT, log $DIR/logs/kueue.log"
}

kueue_down() {
  stop_one kueue
  # Without the manager its webhooks would refuse every Kueue object: remove them with it.
  if [[ -f $KUBECONFIG_PATH ]] && readyz; then
    kc delete mutatingwebhookconfiguration/kueue-mutating-webhook-configuration \
      validatingwebhookconfiguration/kueue-validating-webhook-configuration --ignore-not-found >/dev/null
    # And its API: its CRDs' conversion webhook is gone too, and a cluster "without Kueue" is one
    # where kueue.x-k8s.io is not served (what the operator checks).
    local crds
    crds=$(kc get crd -o name | grep '\.kueue\.x-k8s\.io$' || true)
    [[ -z $crds ]] || kc delete $crds --ignore-not-found --wait=false >/dev/null
  fi
}

up() {
  local t0=$SECONDS
  if healthy; then
    log "already up ($DIR)"
    real_node up
    [[ ${KUBETUNE_KUEUE:-0} != 1 ]] || kueue_up
    echo "export KUBECONFIG=$KUBECONFIG_PATH"
    return 0
  fi
  # Anything left from a crashed or half-started run: stop what we started, then start clean.
  if compgen -G "$DIR/pids/*.pid" >/dev/null; then
    log "cleaning up a previous run in $DIR"
    real_node down
    stop_all
  fi
  rm -rf "${DIR:?}"/{ready,etcd,pki,logs,pids,kubeconfig,*.kubeconfig}
  mkdir -p "$DIR/logs" "$DIR/pids" && mkdir -m 700 "$DIR/etcd"

  local p name
  for p in "kube-apiserver:$API_PORT" "etcd:$ETCD_PORT" "etcd:$ETCD_PEER_PORT" \
    "kube-controller-manager:$KCM_PORT" "kube-scheduler:$SCHED_PORT" "kwok:$KWOK_PORT"; do
    name=${p%%:*}
    port_busy "${p#*:}" && {
      echo "port 127.0.0.1:${p#*:} is already in use (another cluster? set KUBETUNE_APISERVER_PORT / KUBETUNE_PORT_BASE)" >"$DIR/logs/$name.log"
      fail "$name" "cannot start: port ${p#*:} is in use"
    }
  done
  gen_pki

  start etcd --name kubetune --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kubetune=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_until etcd etcd_healthy

  start_apiserver

  start kube-controller-manager \
    --kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DIR/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --controllers '*,bootstrapsigner,tokencleaner' --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --node-monitor-period 2s --node-monitor-grace-period 20s \
    --enable-hostpath-provisioner \
    --profiling=false --v 1
  start kube-scheduler \
    --kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$DIR/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --profiling=false --v 1
  start kwok --kubeconfig "$DIR/kwok.kubeconfig" --config "$HACK/k8s/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds 20 --cidr 10.244.0.0/16 --node-ip 127.0.0.1 \
    --server-address "127.0.0.1:$KWOK_PORT"
  wait_until kube-controller-manager healthz "$KCM_PORT"
  wait_until kube-scheduler healthz "$SCHED_PORT"
  wait_until kwok kwok_healthy

  kc apply -f "$HACK/k8s/storageclass.yaml" -f "$HACK/k8s/nodes.yaml" >/dev/null
  wait_until kwok nodes_ready
  real_node up || { stop_all; exit 1; }
  [[ ${KUBETUNE_KUEUE:-0} != 1 ]] || kueue_up

  touch "$DIR/ready"
  log "up in $((SECONDS - t0))s: apiserver https://127.0.0.1:$API_PORT, state in $DIR"
  log "use our kubectl by absolute path: $BIN/kubectl (not /usr/bin/kubectl)"
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
}

down() {
  real_node down
  stop_all
  rm -rf "${DIR:?}"/{ready,etcd,pki,logs,pids,kubeconfig,*.kubeconfig}
  rmdir "$DIR" 2>/dev/null || true
  log "down ($DIR)"
}

status() {
  local c rc=0 pid
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    if pid=$(ours "$c"); then printf '%-24s running (pid %s)\n' "$c" "$pid"
    else printf '%-24s not running\n' "$c"; rc=1; fi
  done
  if ((rc == 0)) && [[ -f $DIR/ready ]] && readyz; then
    printf '%-24s https://127.0.0.1:%s/readyz ok\nexport KUBECONFIG=%s\n' apiserver "$API_PORT" "$KUBECONFIG_PATH"
  else
    rc=1
  fi
  return $rc
}

# One up/down at a time per state directory (parallel pytest sessions, make targets).
lock() {
  mkdir -p "$DIR"
  exec 8>"$DIR/.lock"
  flock 8
}

case "${1:-}" in
up) lock; up ;;
down) lock; down ;;
status) status ;;
# A test hook: stop or start only the kube-apiserver (etcd and the rest keep running), e.g. to make
# the operator's watches break and re-list.
apiserver)
  lock
  case "${2:-}" in
  stop) stop_one kube-apiserver ;;
  start) ours kube-apiserver >/dev/null || start_apiserver ;;
  *) echo "usage: $0 apiserver stop|start" >&2; exit 2 ;;
  esac
  ;;
kueue)
  lock
  case "${2:-}" in
  up) kueue_up ;;
  down) kueue_down ;;
  status) pid=$(ours kueue) && kueue_ready >/dev/null 2>&1 && echo "kueue running (pid $pid)" ;;
  *) echo "usage: $0 kueue up|down|status" >&2; exit 2 ;;
  esac
  ;;
*) echo "usage: $0 up|down|status|apiserver stop|start|kueue up|down|status" >&2; exit 2 ;;
esac
