#!/usr/bin/env bash
# One-command, idempotent setup: Debian packages, pinned Kubernetes binaries (built from Go modules,
# cached under ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune), and the .venv with `pip install -e .[dev]`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kubetune"
mkdir -p "$CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }
start=$(date +%s)

# 1. Debian packages the tools need (only when missing).
need=()
for pkg in $(cat hack/apt-packages.txt hack/apt-packages-real-node.txt 2>/dev/null | grep -v '^#'); do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
  log "apt-get install ${need[*]}"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. Pinned Kubernetes binaries (kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, helm).
bash hack/build-binaries.sh

# 3. Python virtualenv, reinstalled only when pyproject.toml changes.
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp_want=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -x .venv/bin/python || "$(cat .venv/.kubetune-stamp 2>/dev/null)" != "$stamp_want" ]]; then
  log "creating .venv and installing .[dev] (pip cache: $CACHE/pip)"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --cache-dir "$CACHE/pip" --upgrade pip
  .venv/bin/pip install -q --cache-dir "$CACHE/pip" -e '.[dev]'
  echo "$stamp_want" > .venv/.kubetune-stamp
fi
log "ready in $(( $(date +%s) - start ))s"
