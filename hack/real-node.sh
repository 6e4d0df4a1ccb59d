#!/usr/bin/env bash
# A real node for the local cluster: containerd + runc (Debian packages), CNI bridge + host-local +
# portmap (containernetworking-plugins) and the pinned kubelet, registered to the control plane that
# hack/cluster.sh runs, as node `kubetune-real-0` with label kubetune.io/node-kind=real.
# See docs/real-node.md.
#
#   hack/real-node.sh up       start (after the control plane is up; hack/cluster.sh calls it when
#                              KUBETUNE_REAL_NODE=1); no-op when already running
#   hack/real-node.sh down     stop kubelet, every pod sandbox, containerd and its shims (by PID), and
#                              undo what `up` created: mounts, network namespaces, iptables rules, the
#                              bridge, the kubepods cgroups, the state directory
#   hack/real-node.sh status   exit 0 when containerd and kubelet run and the node is Ready
#   hack/real-node.sh env      print shell assignments (CRI socket, crictl/ctr commands) for scripts
#
# Needs root. Everything it creates is recorded in $DIR/real-node/ and removed by `down`, which also
# works without the control plane (it never needs the apiserver to clean up).
#
# Environment (all optional; the cluster ones are those of hack/cluster.sh):
#   KUBETUNE_CLUSTER_DIR, KUBETUNE_APISERVER_PORT, KUBETUNE_BIN_DIR
#   KUBETUNE_REAL_NODE_NAME     node name (default kubetune-real-0)
#   KUBETUNE_REAL_NODE_CIDR     pod CIDR on the bridge (default 10.245.0.0/24; kwok's fake IPs use
#                               10.244.0.0/16, so real pod IPs never collide with fake ones)
#   KUBETUNE_REAL_NODE_PORT     kubelet port (default 10250; healthz on port-2)
#   KUBETUNE_CONTAINERD_ROOT    containerd's image store, kept across up/down so imported images stay
#                               (default ${XDG_CACHE_HOME:-~/.cache}/kubetune/containerd)
#   KUBETUNE_REGISTRY_PORT      the OCI registry on 127.0.0.1 (default 5000); its storage is kept across
#                               up/down in ${XDG_CACHE_HOME:-~/.cache}/kubetune/registry, so a push after
#                               a code change sends only the changed layers
set -euo pipefail
shopt -s inherit_errexit

HACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HACK")
DIR=$(realpath -m "${KUBETUNE_CLUSTER_DIR:-$REPO/.cluster}")
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kubetune
BIN=${KUBETUNE_BIN_DIR:-$CACHE/bin/current}
API_PORT=${KUBETUNE_APISERVER_PORT:-6443}
NODE=${KUBETUNE_REAL_NODE_NAME:-kubetune-real-0}
POD_CIDR=${KUBETUNE_REAL_NODE_CIDR:-10.245.0.0/24}
KUBELET_PORT=${KUBETUNE_REAL_NODE_PORT:-10250}
HEALTHZ_PORT=$((KUBELET_PORT - 2))
# CoreDNS (cluster DNS): serves cluster.local on the bridge address, port 53; health/ready on loopback.
DNS_HEALTH_PORT=$((KUBELET_PORT - 6)) DNS_READY_PORT=$((KUBELET_PORT - 7))
CLUSTER_DOMAIN=cluster.local
# The OCI registry (distribution's cmd/registry): pods and helm pull from it, hack/images.sh pushes to it.
REGISTRY_PORT=${KUBETUNE_REGISTRY_PORT:-5000}
REGISTRY=127.0.0.1:$REGISTRY_PORT
REGISTRY_ROOT=$(realpath -m "${KUBETUNE_REGISTRY_ROOT:-$CACHE/registry}")
CTR_ROOT=$(realpath -m "${KUBETUNE_CONTAINERD_ROOT:-$CACHE/containerd}")
STATE=$DIR/real-node
SOCK=$STATE/containerd.sock
BRIDGE=kubetune0
# The first address of the CIDR is the bridge (the pods' gateway).
GATEWAY=$(awk -F'[./]' '{printf "%d.%d.%d.%d", $1, $2, $3, $4 + 1}' <<<"$POD_CIDR")
# The `kubernetes` Service's ClusterIP (first address of hack/cluster.sh's 10.96.0.0/16).
KUBERNETES_SVC_IP=10.96.0.1
CNI_BIN=${KUBETUNE_CNI_BIN:-/usr/lib/cni}
RUNC=${KUBETUNE_RUNC:-$(command -v runc || echo /usr/sbin/runc)}
PAUSE_IMAGE=kubetune.local/pause:3.10
START_TIMEOUT=${KUBETUNE_START_TIMEOUT:-90}
NFT_COMMENT="kubetune-real-node"

log() { printf '[real-node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

kc() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }
ctr_() { ctr --address "$SOCK" --namespace k8s.io "$@"; }
crictl_() { "$BIN/crictl" --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --timeout 30s "$@"; }

# ---------------------------------------------------------------- processes (by PID, never by name)

# hack/lib.sh: ours, stop_pid, stop_one, spawn (as start), wait_until, client_cert, write_kubeconfig. A
# process is ours when its command line names this state directory.
PIDS=$STATE LOGS=$STATE/logs MARK=$STATE STOP_WAIT=15
# shellcheck source=hack/lib.sh
source "$HACK/lib.sh"
start() { spawn "$@"; }
on_start_failure() {
  log_tail "$1"
  down_quiet; die "$1 $2"
}

# ---------------------------------------------------------------- what `up` creates, recorded for `down`

# iptables: `down` deletes every rule and chain that is in the live ruleset but not in the snapshot
# taken before `up` changed anything (ours: the DNAT below; the bridge/portmap plugins' CNI-* chains;
# the kubelet's KUBE-KUBELET-CANARY chains), for IPv4 and IPv6.
snapshot_iptables() {
  local t
  for t in nat filter mangle; do
    iptables -t "$t" -S >"$STATE/iptables.$t.before" 2>/dev/null || : >"$STATE/iptables.$t.before"
    ip6tables -t "$t" -S >"$STATE/ip6tables.$t.before" 2>/dev/null || : >"$STATE/ip6tables.$t.before"
  done
}

restore_iptables() {
  local tool t line chain added
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for t in nat filter mangle; do
      [[ -f $STATE/$tool.$t.before ]] || continue
      added=$("$tool" -t "$t" -S 2>/dev/null | grep -vxF -f "$STATE/$tool.$t.before" || true)
      [[ -n $added ]] || continue
      # Rules first (newest first), then the chains they lived in.
      while read -r line; do
        [[ $line == "-A "* ]] || continue
        eval "\"$tool\" -t \"$t\" -D ${line#-A }" 2>/dev/null || log "could not delete $tool -t $t: $line"
      done < <(tac <<<"$added")
      while read -r line; do
        [[ $line == "-N "* ]] || continue
        chain=${line#-N }
        "$tool" -t "$t" -F "$chain" 2>/dev/null || true
        "$tool" -t "$t" -X "$chain" 2>/dev/null || log "could not delete chain $tool -t $t $chain"
      done <<<"$added"
    done
  done
}

# Mounts under our directories (pod volumes, container rootfs, sandbox shm) and the network namespaces
# CNI made for our pods (/run/netns/cni-*, not there before `up`).
our_mounts() {
  awk '{print $2}' /proc/self/mounts | sed 's/\\040/ /g' |
    grep -E "^($STATE|$CTR_ROOT)(/|$)" || true
  local ns
  for ns in /run/netns/cni-*; do
    [[ -e $ns ]] || continue
    grep -qxF "$ns" "$STATE/netns.before" 2>/dev/null || echo "$ns"
  done
}

unmount_ours() {
  local m
  # Deepest first.
  our_mounts | awk '{print length, $0}' | sort -rn | cut -d' ' -f2- | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
    if [[ $m == /run/netns/cni-* ]]; then rm -f "$m"; fi
  done
  true
}

# cgroups the kubelet (cgroupsPerQOS) and runc made: /kubepods in each v1 hierarchy.
remove_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d $d ]] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d $d ]] && log "cgroup $d still has processes: left in place"
  done
  true
}

# ---------------------------------------------------------------- pieces

node_cert() {
  local pki=$DIR/pki
  [[ -f $pki/ca.key ]] || die "no cluster CA in $pki: start the control plane first (hack/cluster.sh up)"
  client_cert "$pki" "$STATE/kubelet" "system:node:$NODE" system:nodes "" 365
  write_kubeconfig "system:node:$NODE" "$pki/ca.crt" "$STATE/kubelet" "$STATE/kubelet.kubeconfig"
}

render() {
  sed -e "s#@ROOT@#$CTR_ROOT#g" -e "s#@STATE@#$STATE/containerd#g" -e "s#@SOCK@#$SOCK#g" \
    -e "s#@RUNC@#$RUNC#g" -e "s#@CNI_BIN@#$CNI_BIN#g" -e "s#@CNI_CONF@#$STATE/cni#g" \
    -e "s#@BRIDGE@#$BRIDGE#g" -e "s#@POD_CIDR@#$POD_CIDR#g" -e "s#@GATEWAY@#$GATEWAY#g" \
    -e "s#@IPAM_DIR@#$STATE/ipam#g" -e "s#@KUBELET_PORT@#$KUBELET_PORT#g" \
    -e "s#@HEALTHZ_PORT@#$HEALTHZ_PORT#g" -e "s#@CA@#$DIR/pki/ca.crt#g" \
    -e "s#@CGROUPS_PER_QOS@#${KUBETUNE_CGROUPS_PER_QOS:-true}#g" -e "s#@POD_LOGS@#$STATE/pod-logs#g" \
    -e "s#@RESOLV@#/etc/resolv.conf#g" -e "s#@NODE_IP@#$GATEWAY#g" -e "s#@CLUSTER_DOMAIN@#$CLUSTER_DOMAIN#g" \
    -e "s#@REGISTRY_HOSTS@#$STATE/certs.d#g" "$1"
}

network_up() {
  ls -1d /run/netns/cni-* 2>/dev/null >"$STATE/netns.before" || : >"$STATE/netns.before"
  snapshot_iptables
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    echo "$BRIDGE" >"$STATE/bridge.created"
  fi
  ip addr replace "$GATEWAY/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Pods reach the apiserver through the `kubernetes` Service IP, as in any cluster. There is no
  # kube-proxy: one DNAT rule plays it, 10.96.0.1:443 -> 127.0.0.1:<apiserver> (the apiserver binds
  # loopback only). DNAT to 127.0.0.1 from another interface needs route_localnet on that interface
  # (the setting goes away with the bridge).
  sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
  iptables -t nat -A PREROUTING -i "$BRIDGE" -d "$KUBERNETES_SVC_IP/32" -p tcp --dport 443 \
    -m comment --comment "$NFT_COMMENT" -j DNAT --to-destination "127.0.0.1:$API_PORT"
}

network_down() {
  restore_iptables
  if [[ -f $STATE/bridge.created ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE"
  fi
  rm -f "$STATE/bridge.created"
}

# The sandbox image: a static Go pause built once into the cache, imported into containerd.
pause_image() {
  ctr_ images check "name==$PAUSE_IMAGE" 2>/dev/null | grep -q "$PAUSE_IMAGE" && return 0
  local pdir=$CACHE/bin/pause-3.10 t
  if [[ ! -x $pdir/pause ]]; then
    mkdir -p "$pdir"
    (cd "$HACK/k8s/real-node/pause" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod \
      GOCACHE="$CACHE/go/build" go build -trimpath -ldflags '-s -w' -o "$pdir/pause.tmp" .)
    mv "$pdir/pause.tmp" "$pdir/pause"
  fi
  t=$(mktemp -d)
  local c
  c=$(buildah from scratch)
  buildah copy "$c" "$pdir/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  buildah commit -q "$c" "$PAUSE_IMAGE" >/dev/null
  buildah rm "$c" >/dev/null
  buildah push -q "$PAUSE_IMAGE" "docker-archive:$t/pause.tar:$PAUSE_IMAGE"
  ctr_ images import --no-unpack=false "$t/pause.tar" >/dev/null
  rm -rf "$t"
  log "imported $PAUSE_IMAGE"
}

# Debian bookworm has no cri-tools: crictl from the Go module proxy (~1 min), next to the other pins.
CRICTL_VERSION=v1.34.0
build_crictl() {
  local out=$CACHE/bin/crictl-$CRICTL_VERSION
  if [[ ! -x $out/crictl ]]; then
    log "building crictl $CRICTL_VERSION"
    mkdir -p "$out"
    GOBIN=$out GOTOOLCHAIN=local CGO_ENABLED=0 GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build \
      go install -trimpath "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2
  fi
  ln -sfn "../crictl-$CRICTL_VERSION/crictl" "$BIN/crictl"
}

# Cluster DNS: CoreDNS (hack/build-binaries.sh builds it from Go modules) answers for cluster.local from
# the API (Services, headless Services' pod hostnames, pod IPs) and forwards other names to the host's
# resolvers. It listens on the bridge address, which every pod reaches: the kubelet's clusterDNS.
corefile() {
  cat <<EOF
.:53 {
    bind $GATEWAY
    errors
    health 127.0.0.1:$DNS_HEALTH_PORT
    ready 127.0.0.1:$DNS_READY_PORT
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $DIR/kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    forward . /etc/resolv.conf
    cache 5
}
EOF
}

dns_ready() { curl -sf --max-time 2 "http://127.0.0.1:$DNS_READY_PORT/ready" >/dev/null; }

dns_up() {
  [[ -x $BIN/coredns ]] || die "$BIN/coredns is missing: run 'KUBETUNE_BUILD_ONLY=coredns bash hack/build-binaries.sh'"
  corefile >"$STATE/Corefile"
  start coredns "$BIN/coredns" -conf "$STATE/Corefile" -pidfile "$STATE/coredns.self.pid"
  wait_until coredns dns_ready
}

# The OCI registry on loopback, plain HTTP (only this host reaches it: containerd pulls on the host).
# containerd is told so in certs.d/<host:port>/hosts.toml, the way it is configured for any registry.
registry_config() {
  cat <<EOF
version: 0.1
log:
  level: warn
  accesslog: {disabled: true}
storage:
  filesystem: {rootdirectory: $REGISTRY_ROOT}
  delete: {enabled: true}
  maintenance:
    uploadpurging: {enabled: true, age: 24h, interval: 24h, dryrun: false}
http:
  addr: $REGISTRY
  # Signs upload state between requests; one instance, so any value kept for its lifetime will do.
  secret: $(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  draintimeout: 5s
EOF
}

registry_hosts() {
  mkdir -p "$STATE/certs.d/$REGISTRY"
  cat >"$STATE/certs.d/$REGISTRY/hosts.toml" <<EOF
# hack/real-node.sh: the local registry speaks plain HTTP on loopback.
server = "http://$REGISTRY"

[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
}

registry_ready() { curl -sf --max-time 2 "http://$REGISTRY/v2/" >/dev/null; }

registry_up() {
  [[ -x $BIN/registry ]] || die "$BIN/registry is missing: run 'KUBETUNE_BUILD_ONLY=registry bash hack/build-binaries.sh'"
  if registry_ready && ! ours registry >/dev/null; then
    die "something else answers on $REGISTRY: set KUBETUNE_REGISTRY_PORT to a free port"
  fi
  mkdir -p "$REGISTRY_ROOT"
  registry_config >"$STATE/registry.yml"
  registry_hosts
  # No tracing exporter (distribution v3 enables OpenTelemetry from the environment).
  OTEL_TRACES_EXPORTER=none start registry "$BIN/registry" serve "$STATE/registry.yml"
  wait_until registry registry_ready
}

node_ready() {
  kc get node "$NODE" -o \
    'jsonpath={.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints[*].key}' 2>/dev/null |
    awk '$1 == "True" && $0 !~ /not-ready/ {ok=1} END {exit !ok}'
}

kubelet_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$HEALTHZ_PORT/healthz" | grep -qx ok; }

# ---------------------------------------------------------------- commands

up() {
  local t0=$SECONDS
  [[ $(id -u) == 0 ]] || die "the real node needs root (containerd, runc, network namespaces, iptables)"
  local x
  for x in containerd ctr runc iptables ip buildah openssl go; do
    command -v "$x" >/dev/null || die "$x is missing: run make setup (hack/apt-packages-real-node.txt)"
  done
  [[ -x $CNI_BIN/bridge ]] || die "CNI plugins missing in $CNI_BIN: apt-get install containernetworking-plugins"
  [[ -x $BIN/kubelet ]] || die "$BIN/kubelet is missing: run hack/build-binaries.sh"
  [[ -x $BIN/crictl ]] || build_crictl
  if ours kubelet >/dev/null && ours containerd >/dev/null && ours coredns >/dev/null && ours registry >/dev/null &&
    node_ready; then
    log "already up"; return 0
  fi
  [[ -d $STATE ]] && { log "cleaning up a previous real node in $STATE"; down_quiet; }
  mkdir -p "$STATE"/{logs,cni,ipam,pod-logs,kubelet} "$CTR_ROOT"

  network_up
  render "$HACK/k8s/real-node/containerd.toml.in" >"$STATE/containerd.toml"
  render "$HACK/k8s/real-node/cni.conflist.in" >"$STATE/cni/10-kubetune.conflist"
  render "$HACK/k8s/real-node/kubelet-config.yaml.in" >"$STATE/kubelet-config.yaml"
  node_cert

  dns_up
  registry_up
  start containerd containerd --config "$STATE/containerd.toml" --log-level warn
  wait_until containerd ctr --address "$SOCK" version
  pause_image

  # PATH: the kubelet runs `iptables` (canary chains) and `mount`; crictl is for debugging.
  start kubelet "$BIN/kubelet" --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet/pki" \
    --hostname-override "$NODE" --node-ip "$GATEWAY" \
    --node-labels "kubetune.io/node-kind=real,kubernetes.io/hostname=$NODE" --v 1
  wait_until kubelet kubelet_healthy
  wait_until kubelet node_ready
  log "node $NODE Ready in $((SECONDS - t0))s (pods on $BRIDGE $POD_CIDR; logs in $STATE/logs)"
}

# Stop everything and undo what `up` did. Order: kubelet (so it does not restart what we stop), the pod
# sandboxes through CRI (CNI DEL releases IPs and netns), containerd, leftover shims, then mounts,
# iptables, bridge, cgroups, state.
down_quiet() {
  [[ -d $STATE ]] || return 0
  stop_one kubelet
  stop_one coredns
  stop_one registry
  local pid
  if pid=$(ours containerd); then
    if [[ -x $BIN/crictl ]]; then
      local pods
      pods=$(crictl_ pods -q 2>/dev/null || true)
      if [[ -n $pods ]]; then
        # shellcheck disable=SC2086
        crictl_ stopp $pods >/dev/null 2>&1 || true
        # shellcheck disable=SC2086
        crictl_ rmp -f $pods >/dev/null 2>&1 || true
      fi
    fi
    stop_one containerd
  fi
  rm -f "$(pidfile containerd)"
  # Shims outlive containerd by design; ours name our socket on their command line.
  local p cmd
  for p in /proc/[0-9]*; do
    { cmd=$(tr '\0' ' ' <"$p/cmdline"); } 2>/dev/null || continue
    [[ $cmd == *containerd-shim* && $cmd == *"$SOCK"* ]] || continue
    stop_pid "${p#/proc/}" "shim" 5
  done
  unmount_ours
  network_down
  remove_cgroups
  if [[ -n $(our_mounts | grep "^$STATE" || true) ]]; then
    log "mounts remain under $STATE; not deleting it"
    return 1
  fi
  rm -rf "${STATE:?}"
  # containerd's runtime state (/run/containerd/...) is per-process and gone; its image store stays.
}

down() {
  if [[ ! -d $STATE ]]; then return 0; fi
  # Best effort: drop the Node object so the control plane does not keep a NotReady node around.
  if [[ -f $DIR/kubeconfig ]]; then
    kc delete node "$NODE" --ignore-not-found --wait=false --request-timeout=5s >/dev/null 2>&1 || true
  fi
  down_quiet
  log "down"
}

status() {
  local rc=0 pid
  for c in coredns registry containerd kubelet; do
    if pid=$(ours "$c"); then printf '%-24s running (pid %s)\n' "$c" "$pid"
    else printf '%-24s not running\n' "$c"; rc=1; fi
  done
  if node_ready; then printf '%-24s Ready\n' "node/$NODE"; else printf '%-24s not Ready\n' "node/$NODE"; rc=1; fi
  return $rc
}

env_() {
  printf 'KUBETUNE_REAL_NODE_NAME=%q\nKUBETUNE_CRI_SOCKET=%q\nKUBETUNE_REAL_NODE_STATE=%q\nKUBETUNE_POD_CIDR=%q\n' \
    "$NODE" "$SOCK" "$STATE" "$POD_CIDR"
  printf 'KUBETUNE_REGISTRY=%q\n' "$REGISTRY"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
env) env_ ;;
*) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
