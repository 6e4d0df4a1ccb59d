"""A code change to the trainer, to a pod of it running on the real node: archive import against registry.

Both ways start from the same place (the images built, pushed and imported once) and make their own
one-line change to the trainer package (a comment in kubetune_trainer/__init__.py) in a copy of the
repository, so buildah's cache rebuilds only the package layer. Then:

- `import` (the way before the registry): `hack/images.sh trainer import`: the image to a
  docker-archive and `ctr images import`, the whole 6 GB written and read again; a pod with
  imagePullPolicy: Never.
- `registry`: `hack/images.sh trainer push`: only the layers the registry lacks travel; a pod of
  `127.0.0.1:5000/kubetune/trainer@<digest>` that the kubelet pulls (only the changed layer).

Rows per way: `<way>_build_s`, `<way>_deliver_s` (import, or push), `<way>_pod_running_s` (pod created
to its container started, the pull included), `<way>_total_s`; and `import_over_registry` (the ratio of
the totals). Needs root and the real-node packages; starts and stops its own cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

WAYS = ("import", "registry")


def run() -> dict[str, Any]:
    from tests.e2e import scenario as sc

    cluster = sc.Cluster()
    used: list[str] = []
    try:
        cluster.up()
        cluster.images()  # everything built and pushed once: the state after the last change
        cluster.sh("bash", "hack/images.sh", "import", timeout=1800)  # ... and imported, for the old way
        env = sc.Env(cluster)
        sc.prepare_namespace(env)
        out: dict[str, Any] = {}
        for way in WAYS:
            tag = f"bench-{way}"
            with tempfile.TemporaryDirectory(prefix="kubetune-delivery-") as tmp:
                copy = _changed_copy(Path(tmp))
                build_s = _timed(cluster, copy, tag, "trainer")
                deliver_s = _timed(cluster, copy, tag, "import" if way == "import" else "push")
            if way == "import":
                image, policy = f"kubetune.local/kubetune-trainer:{tag}", "Never"
            else:
                image, policy = "@".join(sc.image("trainer", tag)), "IfNotPresent"
            used.append(image)
            running_s = _pod_running(sc, env, f"delivery-{way}", image, policy)
            out.update(
                {
                    f"{way}_build_s": build_s,
                    f"{way}_deliver_s": deliver_s,
                    f"{way}_pod_running_s": running_s,
                    f"{way}_total_s": round(build_s + deliver_s + running_s, 1),
                }
            )
        out["import_over_registry"] = round(out["import_total_s"] / out["registry_total_s"], 1)
        return out
    finally:
        _drop_bench_images(cluster, used)
        cluster.down()


def _changed_copy(tmp: Path) -> Path:
    """The working tree (tracked and untracked, not ignored files) with one new comment line in the
    trainer package: a code change as a user makes it."""
    from tests.kubeutil import REPO

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    copy = tmp / "repo"
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            dst = copy / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    init = copy / "trainer_image" / "kubetune_trainer" / "__init__.py"
    init.write_text(init.read_text() + f"# bench/image_delivery: change {uuid.uuid4().hex}\n")
    return copy


def _timed(cluster: Any, copy: Path, tag: str, step: str) -> float:
    t0 = time.monotonic()
    env = {**cluster.env(), "KUBETUNE_IMAGE_TAG": tag}
    proc = subprocess.run(
        ["bash", str(copy / "hack" / "images.sh"), step],
        env=env,
        text=True,
        capture_output=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/images.sh {step} failed:\n{proc.stderr[-3000:]}")
    return round(time.monotonic() - t0, 1)


def _pod_running(sc: Any, env: Any, name: str, image: str, policy: str) -> float:
    """Create a pod of `image` on the real node; seconds until the kubelet reports its container started
    (scheduling, the pull when there is one, sandbox and container start)."""
    env.core.create_namespaced_pod(
        env.namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "nodeSelector": {"kubetune.io/node-kind": "real"},
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": policy,
                        "command": ["python", "-c", "import kubetune_trainer; import time; time.sleep(600)"],
                        "resources": {"requests": {"cpu": "50m"}},
                    }
                ],
            },
        },
    )
    t0 = time.monotonic()

    def started() -> bool:
        pod = env.core.read_namespaced_pod(name, env.namespace)
        for cs in pod.status.container_statuses or []:
            if cs.state and (cs.state.running or cs.state.terminated):
                return True
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"):
                raise RuntimeError(f"{name}: {waiting.reason}: {waiting.message}")
        return False

    sc.wait_for(started, 900, interval=0.1, desc=f"{name} to start")
    took = round(time.monotonic() - t0, 1)
    env.core.delete_namespaced_pod(name, env.namespace, grace_period_seconds=0)
    return took


def _drop_bench_images(cluster: Any, refs: list[str]) -> None:
    """The bench's images leave the buildah store and containerd (they share every layer with dev's but
    the changed package layer); the registry keeps its two small bench tags."""
    ctr = ["ctr", "--address", str(cluster.cri_socket), "-n", "k8s.io", "images"]
    for ref in refs:
        cluster.sh(*ctr, "rm", ref, check=False)
    for way in WAYS:
        cluster.sh("buildah", "rmi", f"kubetune.local/kubetune-trainer:bench-{way}", check=False)
    cluster.sh("buildah", "rmi", "--prune", check=False)
