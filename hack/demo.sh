#!/usr/bin/env bash
# `make demo`: the product end to end on a real kubelet node (see docs/real-node.md).
# Starts its own cluster (KUBETUNE_E2E_CLUSTER_DIR, default /tmp/kubetune-e2e; apiserver on 6543) with
# KUBETUNE_REAL_NODE=1, builds and imports the images (cached under ~/.cache/kubetune), helm-installs
# the chart, trains the digits FineTuneJob while preempting it three times for real (live table), prints
# a summary and stops the cluster. Pass --keep to leave it running, --verify to compare the final
# weights with an uninterrupted host run.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "make demo needs root (containerd, runc, network namespaces)" >&2; exit 1; }
for pkg in $(grep -v '^#' hack/apt-packages-real-node.txt); do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
    { echo "missing Debian package $pkg: apt-get install $(grep -v '^#' hack/apt-packages-real-node.txt | tr '\n' ' ')" >&2; exit 1; }
done
exec .venv/bin/python -m tests.e2e.demo "$@"
