#!/usr/bin/env bash
# Container images for the real node, with no registry and no Docker engine:
#
#   base      kubetune/base:bookworm-py311 from debootstrap (Debian bookworm minbase + python3.11,
#             python3-venv, python-is-python3, tini, ca-certificates): the stand-in for
#             python:3.11-slim-bookworm, passed to both Dockerfiles as --build-arg BASE_IMAGE.
#   wheels    a wheelhouse of every wheel the two images install (torch included), pinned to the
#             versions in .venv (so the in-cluster trainer computes bit for bit what the host one
#             does), downloaded once from PyPI into ~/.cache/kubetune/wheels.
#   operator  buildah build of ./Dockerfile          -> kubetune.local/kubetune-operator:dev
#   trainer   buildah build of trainer_image/Dockerfile -> kubetune.local/kubetune-trainer:dev
#   push      buildah push of both images to the real node's registry (hack/real-node.sh: distribution's
#             registry on 127.0.0.1:5000) as 127.0.0.1:5000/kubetune/{operator,trainer}:<tag>. Only
#             layers the registry lacks travel: after a code change, the package layer (MBs), not the
#             6 GB of torch. Layers go uncompressed (loopback: gzip of 6 GB costs more CPU than the bytes
#             it saves). The digests land in ~/.cache/kubetune/images/pushed.env for pinning by digest.
#   pull      the pushed images into the real node's containerd through CRI (crictl pull, the kubelet's
#             path), as a pre-pulling DaemonSet does on a real cluster: the first trainer pod then
#             starts in seconds, not after a 6 GB pull. Only layers containerd lacks are fetched.
#   chart     `helm package` charts/kubetune and `helm push` it to oci://127.0.0.1:5000/charts, so it
#             installs as from any OCI registry: helm install kubetune oci://127.0.0.1:5000/charts/kubetune
#             --version <chart version> --plain-http.
#   import    the way before the registry: each image to a docker-archive, `ctr images import` into the
#             real node's containerd (namespace k8s.io), for pods with imagePullPolicy: Never. Writes
#             and reads the whole 6 GB on every trainer change (bench/image_delivery compares the two).
#
#   hack/images.sh [all|base|wheels|operator|trainer|push|pull|chart|import]...   (default: all = every
#   step but import)
#
# Both Dockerfiles install with `pip --no-cache-dir`, so a pip cache mount would stay empty. Instead
# the build mounts the wheelhouse and a pip.conf (no-index, find-links) into every RUN step: torch is
# downloaded once per machine and never reaches an image layer twice. Neither mount is committed, so
# the images are the ones `docker build` makes. buildah's layer cache (--layers) makes a rebuild with
# an unchanged context take seconds. Timings of the last run: ~/.cache/kubetune/images/timings.log.
#
# Environment: KUBETUNE_IMAGE_TAG (default dev), KUBETUNE_CLUSTER_DIR (to find the node's containerd and
# registry).
set -euo pipefail
shopt -s inherit_errexit

HACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HACK")
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kubetune
IMAGES=$CACHE/images
WHEELS=$CACHE/wheels
TAG=${KUBETUNE_IMAGE_TAG:-dev}
BASE_IMAGE=localhost/kubetune/base:bookworm-py311
OPERATOR_IMAGE=kubetune.local/kubetune-operator:$TAG
TRAINER_IMAGE=kubetune.local/kubetune-trainer:$TAG
SUITE=bookworm
MIRROR=${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3.11,python3-venv,python-is-python3,tini,ca-certificates
NODE_ENV=$(bash "$HACK/real-node.sh" env)
SOCK=$(sed -n 's/^KUBETUNE_CRI_SOCKET=//p' <<<"$NODE_ENV")
REGISTRY=$(sed -n 's/^KUBETUNE_REGISTRY=//p' <<<"$NODE_ENV")
HELM=${KUBETUNE_BIN_DIR:-$CACHE/bin/current}/helm
CRICTL=${KUBETUNE_BIN_DIR:-$CACHE/bin/current}/crictl

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
timed() { # timed <label> <command...>: run, log and record the wall time
  local label=$1 t0=$SECONDS; shift
  "$@"
  log "$label: $((SECONDS - t0))s"
  printf '%s %s %ss\n' "$(date -u +%FT%TZ)" "$label" "$((SECONDS - t0))" >>"$IMAGES/timings.log"
}
has_image() { buildah images -q "$1" >/dev/null 2>&1; }

base() {
  local stamp want=$SUITE:$BASE_PACKAGES
  stamp=$(cat "$IMAGES/base.stamp" 2>/dev/null || true)
  if has_image "$BASE_IMAGE" && [[ $stamp == "$want" ]]; then log "base: $BASE_IMAGE is current"; return; fi
  local rootfs=$IMAGES/rootfs
  if [[ ! -f $IMAGES/rootfs.tar || $stamp != "$want" ]]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$IMAGES/debootstrap.log" 2>&1 ||
      { tail -20 "$IMAGES/debootstrap.log" >&2; die "debootstrap failed (log: $IMAGES/debootstrap.log)"; }
    # What python:*-slim leaves out too: package caches, lists, docs, man pages.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    tar --numeric-owner -C "$rootfs" -cf "$IMAGES/rootfs.tar.tmp" .
    mv "$IMAGES/rootfs.tar.tmp" "$IMAGES/rootfs.tar"
    rm -rf "$rootfs"
  fi
  local c
  c=$(buildah from scratch)
  buildah add "$c" "$IMAGES/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="Debian $SUITE minbase + Python 3.11 (debootstrap; kubetune local base)" "$c"
  buildah commit -q --rm "$c" "$BASE_IMAGE" >/dev/null
  echo "$want" >"$IMAGES/base.stamp"
  log "base: built $BASE_IMAGE"
}

wheels() {
  # The versions the host .venv runs: the in-cluster trainer must compute exactly what it does.
  local venv=$REPO/.venv
  [[ -x $venv/bin/pip ]] || die "no $venv: run make setup"
  mkdir -p "$WHEELS"
  "$venv/bin/pip" freeze --exclude-editable | grep -v '^kubetune' >"$WHEELS.constraints.new"
  if cmp -s "$WHEELS.constraints.new" "$WHEELS.constraints.txt" && [[ -f $WHEELS/.complete ]]; then
    rm -f "$WHEELS.constraints.new"; log "wheels: current ($(du -sh "$WHEELS" | cut -f1))"; return
  fi
  mv "$WHEELS.constraints.new" "$WHEELS.constraints.txt"
  rm -f "$WHEELS/.complete"
  # Everything `pip install .[operator]` / `.[trainer]` and `python -m build` need, offline after this.
  # The host is the image's platform (Linux x86_64, CPython 3.11).
  "$venv/bin/pip" download -q -d "$WHEELS" -c "$WHEELS.constraints.txt" --only-binary=:all: \
    "$REPO[operator,trainer]" build 'setuptools>=68' wheel pip
  rm -f "$WHEELS"/kubetune-*.whl
  touch "$WHEELS/.complete"
  log "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
}

build() { # build <image> <dockerfile>
  local image=$1 dockerfile=$2
  has_image "$BASE_IMAGE" || die "no $BASE_IMAGE: run hack/images.sh base"
  [[ -f $WHEELS/.complete ]] || die "no wheelhouse: run hack/images.sh wheels"
  printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' >"$IMAGES/pip.conf"
  # --isolation chroot + host network: RUN steps need no netns/CNI of their own (apt-get in the
  # trainer Dockerfile reaches the Debian mirror). The volumes exist only while RUN steps run.
  buildah build --layers --isolation chroot --network host --pull=false \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --volume "$WHEELS:/wheelhouse:ro" --volume "$IMAGES/pip.conf:/etc/pip.conf:ro" \
    -f "$REPO/$dockerfile" -t "$image" "$REPO" >"$IMAGES/build-$(basename "${image%%:*}").log" 2>&1 ||
    { tail -30 "$IMAGES/build-$(basename "${image%%:*}").log" >&2; buildah rm --all >/dev/null 2>&1 || true
      die "build of $image failed"; }
  # Each trainer build leaves ~6 GB of layers; drop those no tagged image uses any more (an earlier
  # build's), so the disk holds one generation. This machine's disk is small: it matters.
  buildah rmi --prune >/dev/null 2>&1 || true
  log "$image: $(buildah images --format '{{.Size}}' "$image" | head -1)"
}

import_one() { # import_one <image>: into the real node's containerd unless this image ID is there already
  local image=$1 id name stamp tar
  [[ -S $SOCK ]] || die "the real node's containerd is not running ($SOCK): KUBETUNE_REAL_NODE=1 make cluster-up"
  id=$(buildah images -q --no-trunc "$image" | head -1)
  # containerd's name: a first component without a dot is a Docker Hub name.
  name=$image; [[ ${image%%/*} == *.* ]] || name=docker.io/$image
  # The image store outlives the cluster (KUBETUNE_CONTAINERD_ROOT), so an unchanged image is not
  # pushed and imported again (seconds instead of minutes for the trainer).
  stamp=$IMAGES/imported/${name//\//_}
  if [[ $(cat "$stamp" 2>/dev/null) == "$id" ]] &&
    ctr --address "$SOCK" -n k8s.io images ls -q "name==$name" 2>/dev/null | grep -qxF "$name"; then
    log "import: $image already in containerd"; return
  fi
  tar=$IMAGES/import-$$.tar
  buildah push -q "$image" "docker-archive:$tar:$image"
  # Delete the previous version first and let containerd's GC free its layers (--sync waits for it):
  # a re-import only moves the tag, and the old 6 GB would stay in the store.
  ctr --address "$SOCK" -n k8s.io images rm --sync "$name" >/dev/null 2>&1 || true
  ctr --address "$SOCK" -n k8s.io images import "$tar" >/dev/null
  rm -f "$tar"
  mkdir -p "$IMAGES/imported"; echo "$id" >"$stamp"
  log "import: $image"
}

# The CRI plugin also names every image it has seen by its ID (sha256:<config digest>). When a tag moves to
# a new build, that alias keeps the old image (6 GB for the trainer) alive: drop the aliases that no tag
# points at any more; --sync lets containerd's GC free their layers before the next import needs the space.
prune_aliases() {
  local named ref digest
  named=$(ctr --address "$SOCK" -n k8s.io images ls | awk 'NR > 1 && $1 !~ /^sha256:/ {print $3}')
  while read -r ref digest; do
    grep -qxF "$digest" <<<"$named" && continue
    ctr --address "$SOCK" -n k8s.io images rm --sync "$ref" >/dev/null 2>&1 &&
      log "import: dropped $ref (no tag points at it)"
  done < <(ctr --address "$SOCK" -n k8s.io images ls | awk 'NR > 1 && $1 ~ /^sha256:/ {print $1, $3}')
  true
}

registry_up() { curl -sf --max-time 2 "http://$REGISTRY/v2/" >/dev/null; }

push_one() { # push_one <local image> <repository in the registry>: records <repository>:<tag>=<repository>@<digest>
  local image=$1 repo=$2 ref=$REGISTRY/$2:$TAG digest
  buildah push -q --tls-verify=false --format oci --disable-compression \
    --digestfile "$IMAGES/push.digest" "$image" "docker://$ref"
  digest=$(<"$IMAGES/push.digest")
  [[ $digest == sha256:* ]] || die "buildah push $ref wrote no digest"
  touch "$IMAGES/pushed.env"
  { grep -vF "$repo:$TAG=" "$IMAGES/pushed.env" || true; echo "$repo:$TAG=$REGISTRY/$repo@$digest"; } \
    >"$IMAGES/pushed.env.tmp"
  mv "$IMAGES/pushed.env.tmp" "$IMAGES/pushed.env"
  log "push: $ref ($digest)"
}

push() {
  registry_up || die "no registry answers on $REGISTRY: KUBETUNE_REAL_NODE=1 make cluster-up starts it"
  has_image "$OPERATOR_IMAGE" || has_image "$TRAINER_IMAGE" ||
    die "neither $OPERATOR_IMAGE nor $TRAINER_IMAGE is built: run hack/images.sh operator trainer"
  if has_image "$OPERATOR_IMAGE"; then push_one "$OPERATOR_IMAGE" kubetune/operator; fi
  if has_image "$TRAINER_IMAGE"; then push_one "$TRAINER_IMAGE" kubetune/trainer; fi
}

pull() { # what a pre-pulling DaemonSet does: the pushed images into the node through CRI, as the kubelet pulls
  [[ -S $SOCK ]] || die "the real node's containerd is not running ($SOCK): KUBETUNE_REAL_NODE=1 make cluster-up"
  [[ -x $CRICTL ]] || die "no crictl at $CRICTL: hack/real-node.sh up builds it"
  local ref
  for ref in $(sed -n "s#^kubetune/[a-z]*:$TAG=##p" "$IMAGES/pushed.env" 2>/dev/null); do
    "$CRICTL" --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --timeout 20m pull "$ref" >/dev/null
    log "pull: $ref"
  done
}

chart() {
  registry_up || die "no registry answers on $REGISTRY: KUBETUNE_REAL_NODE=1 make cluster-up starts it"
  [[ -x $HELM ]] || die "no helm at $HELM: run make setup"
  local version tmp
  version=$(sed -n 's/^version: *//p' "$REPO/charts/kubetune/Chart.yaml")
  tmp=$(mktemp -d)
  "$HELM" package "$REPO/charts/kubetune" -d "$tmp" >/dev/null
  "$HELM" push "$tmp/kubetune-$version.tgz" "oci://$REGISTRY/charts" --plain-http >"$tmp/push.log" 2>&1 ||
    { cat "$tmp/push.log" >&2; rm -rf "$tmp"; die "helm push failed"; }
  rm -rf "$tmp"
  log "chart: oci://$REGISTRY/charts/kubetune --version $version"
}

import() {
  local i
  [[ -S $SOCK ]] || die "the real node's containerd is not running ($SOCK): KUBETUNE_REAL_NODE=1 make cluster-up"
  prune_aliases
  for i in "$BASE_IMAGE" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
    has_image "$i" && import_one "${i#localhost/}"
  done
  prune_aliases
}

mkdir -p "$IMAGES"
(($#)) || set -- all
for step in "$@"; do
  case $step in
  base) timed base base ;;
  wheels) timed wheels wheels ;;
  operator) timed "build operator" build "$OPERATOR_IMAGE" Dockerfile ;;
  trainer) timed "build trainer" build "$TRAINER_IMAGE" trainer_image/Dockerfile ;;
  push) timed push push ;;
  pull) timed pull pull ;;
  chart) timed chart chart ;;
  import) timed import import ;;
  all)
    timed base base; timed wheels wheels
    timed "build operator" build "$OPERATOR_IMAGE" Dockerfile
    timed "build trainer" build "$TRAINER_IMAGE" trainer_image/Dockerfile
    timed push push; timed pull pull; timed chart chart ;;
  *) die "unknown step $step (all|base|wheels|operator|trainer|push|pull|chart|import)" ;;
  esac
done
