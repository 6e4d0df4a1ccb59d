"""The end-to-end scenario on the real node, shared by tests/e2e, `make demo` and bench/e2e_recovery.

A local control plane plus one real node (kubelet + containerd, hack/real-node.sh), the images built from
the repository's Dockerfiles (hack/images.sh), the chart installed with helm (the operator runs as a pod
from its image), a FineTuneJob on scikit-learn's digits, and real disruptions of the trainer pod while it
trains: scheduler preemption, an Eviction, a plain delete, or a SIGKILL of the container from the host.
Each step is a small function of `Env`; `Timeline` records when each disruption happened and when the
next attempt got through each stage of its start.
"""

from __future__ import annotations

try:  # under pytest, tests/ is on sys.path (tests/conftest.py)
    from kubeutil import BIN_DIR as BIN
    from kubeutil import REPO, wait_for
    from wandbfile import read_wandb_records
except ImportError:  # `python -m tests.e2e.demo` from the repository root
    from tests.kubeutil import BIN_DIR as BIN
    from tests.kubeutil import REPO, wait_for
    from tests.wandbfile import read_wandb_records

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
# The real node's OCI registry (hack/real-node.sh); hack/images.sh pushes the images and the chart there and
# records each image's digest in pushed.env: the scenario pins the images by digest, as a user should.
REGISTRY = f"127.0.0.1:{os.environ.get('KUBETUNE_REGISTRY_PORT', '5000')}"
PUSHED = CACHE / "images" / "pushed.env"
CHART_REF = f"oci://{REGISTRY}/charts/kubetune"
IMAGE_TAG = os.environ.get("KUBETUNE_IMAGE_TAG", "dev")
REAL_NODE = "kubetune-real-0"
RELEASE, OPERATOR_NS = "kubetune", "kubetune-system"
HIGH_PRIORITY = "kubetune-e2e-high"
LABEL_JOB = "kubetune.io/job-name"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_RANK = "kubetune.io/rank"


@dataclass(frozen=True)
class Cluster:
    """Where the scenario's own cluster lives: apart from the default .cluster/ that other test sessions use."""

    dir: Path = Path(os.environ.get("KUBETUNE_E2E_CLUSTER_DIR", "/tmp/kubetune-e2e"))
    api_port: int = int(os.environ.get("KUBETUNE_E2E_APISERVER_PORT", "6543"))
    port_base: int = int(os.environ.get("KUBETUNE_E2E_PORT_BASE", "24790"))

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBETUNE_CLUSTER_DIR": str(self.dir),
            "KUBETUNE_APISERVER_PORT": str(self.api_port),
            "KUBETUNE_PORT_BASE": str(self.port_base),
            "KUBETUNE_REAL_NODE": "1",
            "KUBECONFIG": str(self.kubeconfig),
        }

    def sh(self, *argv: str, timeout: float = 3600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(argv), env=self.env(), cwd=REPO, text=True, capture_output=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-40:])
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}; its last output:\n{tail}")
        return proc

    def up(self) -> None:
        self.sh("bash", "hack/cluster.sh", "up", timeout=300)

    def down(self) -> None:
        self.sh("bash", "hack/cluster.sh", "down", timeout=300, check=False)

    def images(self) -> str:
        """Build (cached) both images, push them and the chart to the real node's registry; returns the
        script's log lines (timings). KUBETUNE_E2E_IMAGE_STEPS="push pull chart" uses the images built last
        time without a rebuild (a rebuild with an unchanged context takes seconds anyway)."""
        steps = os.environ.get("KUBETUNE_E2E_IMAGE_STEPS", "all").split()
        return self.sh("bash", "hack/images.sh", *steps, timeout=3600).stderr

    @property
    def cri_socket(self) -> Path:
        """The real node's containerd socket (hack/real-node.sh: <cluster dir>/real-node/)."""
        return self.dir / "real-node" / "containerd.sock"

    def kubectl(self, *args: str, timeout: float = 120) -> str:
        return self.sh(str(BIN / "kubectl"), *args, timeout=timeout).stdout


class Terminations:
    """How each pod's container ended (exit code, finishedAt), from a watch: a deleted pod's object is
    gone moments after the kubelet reports it, too fast for polling."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.seen: dict[str, tuple[int, float]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                for ev in watch.Watch().stream(
                    self.core.list_namespaced_pod, self.namespace, timeout_seconds=60
                ):
                    pod = ev["object"]
                    for cs in pod.status.container_statuses or []:
                        t = cs.state.terminated
                        if t is not None and pod.metadata.name not in self.seen:
                            self.seen[pod.metadata.name] = (t.exit_code, t.finished_at.timestamp())
            except Exception:  # namespace not there yet, or the watch expired: start again
                time.sleep(0.5)


@dataclass
class Env:
    cluster: Cluster
    namespace: str = "kubetune-e2e"
    core: client.CoreV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)
    terminations: Terminations = field(init=False)

    def __post_init__(self) -> None:
        api = config.new_client_from_config(str(self.cluster.kubeconfig))
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.terminations = Terminations(self.core, self.namespace)

    @property
    def data_root(self) -> Path:
        return self.cluster.dir / "volumes"

    def ftj(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return obj

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.ftj(name).get("status") or {})


# ---------------------------------------------------------------- setup


def image(name: str, tag: str = IMAGE_TAG) -> tuple[str, str]:
    """(repository, digest) of `kubetune/<name>:<tag>` as hack/images.sh last pushed it."""
    pushed = (
        dict(ln.split("=", 1) for ln in PUSHED.read_text().split() if "=" in ln) if PUSHED.exists() else {}
    )
    ref = pushed.get(f"kubetune/{name}:{tag}")
    if not ref:
        raise RuntimeError(f"no kubetune/{name}:{tag} in {PUSHED}: run hack/images.sh (its push step)")
    repo, digest = ref.split("@", 1)
    return repo, digest


def image_ref(name: str) -> str:
    return "@".join(image(name))


def chart_version() -> str:
    chart = yaml.safe_load((REPO / "charts" / "kubetune" / "Chart.yaml").read_text())
    return str(chart["version"])


def install_operator(env: Env, kueue: bool = False) -> None:
    """helm install the chart from the registry (oci://, as docs/install.md tells a user); the operator
    runs as a real pod on the real node from the pushed image, both images pinned by digest. If the
    release does not become ready, the error carries what the cluster says about why. `kueue` sets the
    chart's kueue.enabled (an upgrade back without it turns it off again)."""
    (op_repo, op_digest), (tr_repo, tr_digest) = image("operator"), image("trainer")
    try:
        env.cluster.sh(
            str(BIN / "helm"), "upgrade", "--install", RELEASE, CHART_REF, "--version", chart_version(),
            "--plain-http",
            "--namespace", OPERATOR_NS, "--create-namespace", "--wait", "--timeout", "5m",
            "--set", f"image.repository={op_repo}", "--set", f"image.digest={op_digest}",
            "--set", f"trainer.image.repository={tr_repo}", "--set", f"trainer.image.digest={tr_digest}",
            "--set", "operator.scrapeIntervalSeconds=2",
            "--set-string", "nodeSelector.kubetune\\.io/node-kind=real",
            "--set", f"kueue.enabled={str(kueue).lower()}",
            timeout=400,
        )  # fmt: skip
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{diagnose(env, OPERATOR_NS)}") from None


DIAGNOSTICS = CACHE / "e2e-diagnostics"


def diagnose(env: Env, namespace: str) -> str:
    """What the cluster says about a namespace whose pods did not come up: node conditions, pod states,
    events, container logs, and the real node's kubelet/containerd log tails. The whole dump goes to
    ~/.cache/kubetune/e2e-diagnostics/ (it outlives the cluster's teardown); a short part is returned."""
    kubectl = str(BIN / "kubectl")
    sections: list[tuple[str, list[str]]] = [
        ("nodes", ["get", "nodes", "-o", "wide"]),
        ("real node conditions", ["get", "node", REAL_NODE, "-o",
                                  "jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: "
                                  "{.message}{\"\\n\"}{end}"]),
        ("pods", ["get", "pods", "-n", namespace, "-o", "wide"]),
        ("container states", ["get", "pods", "-n", namespace, "-o",
                              "jsonpath={range .items[*]}{.metadata.name}: {.status.phase} "
                              "{.status.containerStatuses[*].state} "
                              "{.status.containerStatuses[*].lastState}{\"\\n\"}{end}"]),
        ("events", ["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"]),
        ("logs", ["logs", "-n", namespace, "--all-containers", "--tail=40", "--prefix",
                  "-l", "app.kubernetes.io/name=kubetune"]),
        ("previous logs", ["logs", "-n", namespace, "--all-containers", "--tail=40", "--prefix",
                           "--previous", "-l", "app.kubernetes.io/name=kubetune"]),
    ]  # fmt: skip
    free = shutil.disk_usage(CACHE if CACHE.exists() else "/")
    out = [f"---- disk: {free.free / 2**30:.1f} GiB free of {free.total / 2**30:.0f} GiB ({CACHE})"]
    for title, args in sections:
        proc = env.cluster.sh(kubectl, *args, timeout=60, check=False)
        out += [f"---- {title}", (proc.stdout + proc.stderr).rstrip()]
    for name in ("kubelet", "containerd"):
        log = env.cluster.dir / "real-node" / "logs" / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else [f"({log} missing)"]
        out += [f"---- {log} (last 40 lines)", *lines[-40:]]
    text = "\n".join(out)
    DIAGNOSTICS.mkdir(parents=True, exist_ok=True)
    dump = DIAGNOSTICS / f"{time.strftime('%Y%m%dT%H%M%S')}-{namespace}.txt"
    dump.write_text(text + "\n")
    short = "\n".join(text.splitlines()[:120])
    return f"{short}\n(the whole dump: {dump})"


def operator_pod(env: Env) -> client.V1Pod:
    pods = env.core.list_namespaced_pod(OPERATOR_NS).items
    running = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
    assert running, [p.metadata.name for p in pods]
    pod: client.V1Pod = running[0]
    return pod


def host_volume(env: Env, name: str, size: str = "1Gi", read_only: bool = False) -> Path:
    """A hostPath PV on the real node bound to PVC `name` in the job namespace; returns the host directory."""
    path = env.data_root / name
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # trainer pods run as uid 1000
    pv_name = f"{env.namespace}-{name}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": env.namespace, "name": name},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubetune.io/node-kind", "operator": "In", "values": ["real"]}
                            ]
                        }
                    ]
                }
            },
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": env.namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": size}},
        },
    }
    apply(env, pv, pvc)
    return path


def apply(env: Env, *docs: dict[str, Any]) -> None:
    proc = subprocess.run(
        [str(BIN / "kubectl"), "apply", "-f", "-"],
        input=yaml.safe_dump_all(docs),
        env=env.cluster.env(),
        text=True,
        capture_output=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr)


def prepare_namespace(env: Env) -> None:
    apply(
        env,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": env.namespace}},
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": HIGH_PRIORITY},
            "value": 100000,
            "description": "kubetune e2e: a pod that preempts the trainer",
        },
    )


def dataset(env: Env) -> Path:
    """scikit-learn's digits as an ImageFolder on a hostPath PV (claim `digits`)."""
    from kubetune_trainer.digits import write_digits

    path = host_volume(env, "digits")
    if not (path / "digits" / "9").is_dir():
        write_digits(path / "digits")
        for p in path.rglob("*"):
            p.chmod(0o777 if p.is_dir() else 0o644)
    return path / "digits"


def job_spec(steps: int, every: int, grace: int, cpu: str, workers: int = 1) -> dict[str, Any]:
    """The FineTuneJob spec; the same sections run on the host with `kubetune-train -f` (or, for
    `workers` > 1, `torchrun --nproc-per-node <workers>`)."""
    return {
        "workers": workers,
        "model": {"name": "test_resnet", "numClasses": 10},
        "data": {
            "format": "imagefolder",
            "path": "digits",
            "imageSize": 32,
            "valFraction": 0.2,
            "numWorkers": 0,
        },
        "training": {"maxSteps": steps, "batchSize": 32, "learningRate": 0.01, "warmupSteps": 10},
        "checkpoint": {"everySteps": every},
        "wandb": {"mode": "offline", "project": "kubetune-e2e"},
        "metrics": {"port": 9400},
        "resources": {"gpus": 0, "cpu": cpu, "memory": "2Gi"},
        "terminationGracePeriodSeconds": grace,
        "nodeSelector": {"kubetune.io/node-kind": "real"},
        # One thread in the pod and on the host: the same float reductions, so bitwise-equal weights.
        "podTemplate": {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]},
    }


def create_job(
    env: Env,
    name: str,
    steps: int,
    every: int,
    grace: int = 30,
    cpu: str = "1",
    tensorboard: bool = False,
    labels: dict[str, str] | None = None,
    workers: int = 1,
) -> Path:
    """Create the job with its own checkpoint claim (a hostPath PV we can read); returns that host dir.
    A job of that name from an earlier run is deleted first, with its pods. `tensorboard` asks the
    operator to serve the job's board (spec.tensorboard.serve); `labels` go on the FineTuneJob (Kueue's
    queue-name and priority-class)."""
    try:
        env.custom.delete_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, name)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
    wait_for(lambda: not trainer_pods(env, name) and not _exists(env, name), 120, desc=f"old {name} to go")
    ckpt = host_volume(env, f"{name}-ckpt-e2e", size="2Gi")
    shutil.rmtree(ckpt)
    ckpt.mkdir()
    ckpt.chmod(0o777)
    spec = job_spec(steps, every, grace, cpu, workers)
    spec["data"]["claimName"] = "digits"
    spec["checkpoint"]["existingClaim"] = f"{name}-ckpt-e2e"
    if tensorboard:
        spec["tensorboard"] = {"serve": True}
    apply(
        env,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": env.namespace, "labels": dict(labels or {})},
            "spec": spec,
        },
    )
    return ckpt


def _exists(env: Env, name: str) -> bool:
    try:
        env.ftj(name)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


# ---------------------------------------------------------------- observing


def _attempt_rank(pod: client.V1Pod) -> tuple[int, int]:
    labels = pod.metadata.labels or {}
    return int(labels.get(LABEL_ATTEMPT, "0")), int(labels.get(LABEL_RANK, "0"))


def trainer_pods(env: Env, job: str) -> list[client.V1Pod]:
    """The job's trainer pods by attempt, then rank."""
    pods = env.core.list_namespaced_pod(env.namespace, label_selector=f"{LABEL_JOB}={job}").items
    return sorted(pods, key=_attempt_rank)


def running_trainer(env: Env, job: str, rank: int = 0) -> client.V1Pod | None:
    """The newest running pod of `rank` (rank 0 serves the metrics)."""
    for p in reversed([p for p in trainer_pods(env, job) if _attempt_rank(p)[1] == rank]):
        started = any(cs.state.running for cs in p.status.container_statuses or [])
        if p.status.phase == "Running" and started and not p.metadata.deletion_timestamp:
            return p
    return None


def scrape(url: str, timeout: float = 2) -> dict[str, float]:
    """Unlabelled-or-labelled samples of a Prometheus text endpoint, name{labels} -> value."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def trainer_step(pod: client.V1Pod) -> int | None:
    """The trainer's own step, scraped from its metrics port at the pod IP (reachable on the bridge)."""
    if not pod.status.pod_ip:
        return None
    try:
        samples = scrape(f"http://{pod.status.pod_ip}:9400/metrics", timeout=1)
    except OSError:
        return None
    for key, value in samples.items():
        if key.startswith("kubetune_trainer_step"):
            return int(value)
    return None


@dataclass
class Disruption:
    kind: str
    pod: str
    attempt: int
    at: float  # time.time() when the disruption was made
    step_at_disruption: int | None = None
    stopped_at: float | None = None  # container finishedAt (the trainer exited)
    exit_code: int | None = None
    next_pod: str | None = None
    next_created_at: float | None = None  # operator created the next attempt
    next_started_at: float | None = None  # its container started
    next_first_step_at: float | None = None  # first training step after resume
    resumed_from: int | None = None

    def summary(self, grace: int) -> dict[str, Any]:
        def d(a: float | None, b: float | None) -> float | None:
            return round(b - a, 2) if a is not None and b is not None else None

        return {
            "kind": self.kind,
            "pod": self.pod,
            "exit_code": self.exit_code,
            "step_at_disruption": self.step_at_disruption,
            "resumed_from": self.resumed_from,
            "sigterm_to_exit_s": d(self.at, self.stopped_at),
            "grace_period_s": grace,
            "operator_reaction_s": d(self.at, self.next_created_at),
            "pod_start_s": d(self.next_created_at, self.next_started_at),
            "checkpoint_load_to_first_step_s": d(self.next_started_at, self.next_first_step_at),
            "disruption_to_first_step_s": d(self.at, self.next_first_step_at),
        }


def ts(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def follow_recovery(env: Env, job: str, dis: Disruption, timeout: float = 300) -> None:
    """Poll (fast) until the next attempt trains its first step; fill in the timeline of `dis`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = trainer_pods(env, job)
        if dis.pod in env.terminations.seen:
            dis.exit_code, dis.stopped_at = env.terminations.seen[dis.pod]
        newer = [p for p in pods if int(p.metadata.labels.get(LABEL_ATTEMPT, "0")) > dis.attempt]
        if newer:
            p = newer[0]
            dis.next_pod = p.metadata.name
            dis.next_created_at = ts(p.metadata.creation_timestamp)
            for cs in p.status.container_statuses or []:
                if cs.state.running and dis.next_started_at is None:
                    dis.next_started_at = ts(cs.state.running.started_at)
            if dis.next_started_at is not None:
                step = trainer_step(p)
                st = env.status(job)
                if dis.resumed_from is None and step is not None:
                    dis.resumed_from = step
                if step is not None and dis.resumed_from is not None and step > dis.resumed_from:
                    dis.next_first_step_at = time.time()
                    wait_for(lambda: dis.pod in env.terminations.seen, 10, desc=f"the exit of {dis.pod}")
                    dis.exit_code, dis.stopped_at = env.terminations.seen[dis.pod]
                    return
                if st.get("phase") == "Succeeded":
                    return
        time.sleep(0.1)
    raise TimeoutError(f"no training step after {dis.kind} of {dis.pod} within {timeout}s")


# ---------------------------------------------------------------- disruptions


def preempt_by_scheduler(env: Env, pod: client.V1Pod) -> Callable[[], None]:
    """A higher-priority pod that needs the node's CPU: the scheduler preempts the trainer. Returns the
    cleanup that removes the preemptor once it ran, so the next attempt has room again."""
    name = "preemptor"
    env.core.create_namespaced_pod(
        env.namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "priorityClassName": HIGH_PRIORITY,
                "nodeSelector": {"kubetune.io/node-kind": "real"},
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "pause",
                        "image": "kubetune.local/pause:3.10",
                        "imagePullPolicy": "Never",
                        "resources": {"requests": {"cpu": node_free_cpu_for(env, pod)}},
                    }
                ],
            },
        },
    )

    def release() -> None:
        wait_for(lambda: _phase(env, name) == "Running", 120, desc="the preemptor to run")
        env.core.delete_namespaced_pod(name, env.namespace, grace_period_seconds=0)

    return release


def _phase(env: Env, name: str) -> str | None:
    try:
        return str(env.core.read_namespaced_pod(name, env.namespace).status.phase)
    except client.ApiException:
        return None


def node_free_cpu_for(env: Env, pod: client.V1Pod) -> str:
    """CPU (millicores) that fits on the real node only once `pod` is gone."""
    node = env.core.read_node(REAL_NODE)
    alloc = _milli(node.status.allocatable["cpu"])
    pods = env.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={REAL_NODE}").items
    used = sum(
        _milli((c.resources.requests or {}).get("cpu", "0"))
        for p in pods
        if p.status.phase in ("Running", "Pending")
        for c in p.spec.containers
    )
    mine = sum(_milli((c.resources.requests or {}).get("cpu", "0")) for c in pod.spec.containers)
    return f"{alloc - used + mine}m"


def _milli(q: str) -> int:
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def evict(env: Env, pod: client.V1Pod) -> None:
    """What `kubectl drain` does: the Eviction API."""
    env.core.create_namespaced_pod_eviction(
        pod.metadata.name,
        env.namespace,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=pod.metadata.name, namespace=env.namespace)),
    )


def delete(env: Env, pod: client.V1Pod) -> None:
    env.core.delete_namespaced_pod(pod.metadata.name, env.namespace)


def sigkill(env: Env, pod: client.V1Pod) -> None:
    """Kill the container's PID 1 from the host, by PID, with no grace (what an OOM kill or a crashed
    node does to the process)."""
    cid = pod.status.container_statuses[0].container_id.split("://", 1)[1]
    sock = env.cluster.cri_socket
    out = subprocess.run(
        [str(BIN / "crictl"), "--runtime-endpoint", f"unix://{sock}", "inspect", cid],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pid = int(json.loads(out)["info"]["pid"])
    os.kill(pid, 9)


KINDS: dict[str, Callable[[Env, client.V1Pod], Any]] = {
    "scheduler-preemption": preempt_by_scheduler,
    "eviction": evict,
    "delete": delete,
    "sigkill": sigkill,
}


def disrupt(
    env: Env, job: str, kind: str, min_progress: int, log: Callable[[str], None], rank: int = 0
) -> Disruption:
    """Wait until the running attempt trained `min_progress` steps past where it started, then disrupt
    its pod of `rank` and follow the next attempt to its first step (rank 0's: under DDP every rank
    takes each step together)."""
    lead = wait_for(lambda: running_trainer(env, job), 300, desc=f"a running trainer of {job}")
    first = wait_for(lambda: trainer_step(lead), 300, desc="the trainer's metrics")
    wait_for(
        lambda: (trainer_step(lead) or 0) >= first + min_progress,
        300,
        desc=f"{min_progress} steps of training",
    )
    pod = lead if rank == 0 else running_trainer(env, job, rank)
    assert pod is not None and _attempt_rank(pod)[0] == _attempt_rank(lead)[0], f"no running rank {rank}"
    attempt = int(pod.metadata.labels.get(LABEL_ATTEMPT, "0"))
    dis = Disruption(kind, pod.metadata.name, attempt, time.time(), trainer_step(lead))
    log(f"{kind}: {pod.metadata.name} at step {dis.step_at_disruption}")
    release = KINDS[kind](env, pod)
    if callable(release):
        release()
    follow_recovery(env, job, dis)
    log(f"  -> {dis.next_pod} resumed at step {dis.resumed_from}")
    return dis


def wait_done(
    env: Env, job: str, timeout: float = 900, on_tick: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        st = env.status(job)
        if on_tick:
            on_tick(st)
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    result: dict[str, Any] = wait_for(done, timeout, interval=1, desc=f"{job} to finish")
    return result


# ---------------------------------------------------------------- checks


def reference_weights(
    env: Env, job: str, steps: int, every: int, digits: Path, workers: int = 1, cpu: str = "1"
) -> bytes:
    """The same manifest trained uninterrupted on the host with `kubetune-train -f`; for `workers` > 1,
    `torchrun --nproc-per-node <workers>` (the same world size, gloo on loopback)."""
    root = env.cluster.dir / "reference" / job
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spec = job_spec(steps, every, 30, cpu, workers)
    spec["data"]["path"] = str(digits)
    spec["wandb"] = {"mode": "disabled"}
    manifest = root / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": job},
                "spec": spec,
            }
        )
    )
    envv = {k: v for k, v in os.environ.items() if k != "KUBETUNE_CHECKPOINT_DIR"}
    envv.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    envv.pop("KUBETUNE_TERMINATION_LOG", None)
    venv = REPO / ".venv" / "bin"
    argv = [str(venv / "kubetune-train")]
    if workers > 1:
        argv = [str(venv / "torchrun"), "--nproc-per-node", str(workers), "--master-port", "29731",
                "-m", "kubetune_trainer"]  # fmt: skip
    subprocess.run(
        [*argv, "-f", str(manifest), "--checkpoint-dir", str(root / "ckpt"), "--set", "metrics.port=0"],
        env=envv, check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return (root / "ckpt" / "final" / "model.safetensors").read_bytes()


def wandb_history_steps(ckpt: Path) -> tuple[set[str], list[int]]:
    """Run ids and logged steps of every offline W&B run the attempts wrote (WANDB_DIR=/checkpoints)."""
    runs = sorted((ckpt / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    steps: list[int] = []
    for run in runs:
        for f in run.glob("run-*.wandb"):
            for rec in read_wandb_records(f):
                if rec.WhichOneof("record_type") == "history":
                    steps.append(rec.history.step.num)
    return ids, steps


def operator_preemptions(env: Env) -> dict[str, float]:
    """kubetune_preemptions_total by reason, scraped from the operator pod's IP."""
    pod = operator_pod(env)
    samples = scrape(f"http://{pod.status.pod_ip}:8080/metrics")
    return {k: v for k, v in samples.items() if k.startswith("kubetune_preemptions_total{")}


# --- TensorBoard, as a user sees it: kubectl port-forward to the Service, the HTTP API, a real browser ----
TB_PORT = 6006
CHROMIUM = "/usr/bin/chromium"
# The first run's line colour in TensorBoard's light theme (#ff7043): what a drawn curve is made of.
TB_RUN_COLOUR = (255, 112, 67)


def tensorboard_service(job: str) -> str:
    return f"{job}-tensorboard"


@contextlib.contextmanager
def port_forward(env: Env, target: str, remote: int, timeout: float = 60) -> Any:
    """`kubectl port-forward <target> :<remote>` (a Service: kubectl picks one of its pods, as for a
    user); yields the local port kubectl chose and stops the forward afterwards (by PID)."""
    argv = [str(BIN / "kubectl"), "--kubeconfig", str(env.cluster.kubeconfig), "-n", env.namespace]
    proc = subprocess.Popen(
        [*argv, "port-forward", target, f":{remote}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:41234 -> 6006"
        if "Forwarding from" not in line:
            proc.kill()
            raise AssertionError(
                f"kubectl port-forward {target}: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        port = int(line.split("->")[0].rsplit(":", 1)[1])
        yield port
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


def http_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def tensorboard_scalar_steps(port: int, tag: str = "train/loss", timeout: float = 120) -> list[int]:
    """The steps of `tag` as TensorBoard's scalars API serves them (waiting until its reload saw them)."""
    base = f"http://127.0.0.1:{port}"
    got: list[list[float]] = []

    def loaded() -> bool:
        nonlocal got
        try:
            runs = http_json(f"{base}/data/runs")
            if not runs:
                return False
            got = http_json(f"{base}/data/plugin/scalars/scalars?run={runs[0]}&tag={tag}")
        except OSError:
            return False
        return bool(got)

    wait_for(loaded, timeout, desc=f"TensorBoard to serve {tag}")
    return [int(step) for _, step, _ in got]


def screenshot(url: str, out: Path, budget_ms: int = 20000) -> None:
    """A headless Chromium screenshot (flags as this machine needs: no sandbox as root, no background
    networking on a closed network)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        import tempfile

        profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="kubetune-chromium-"))
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1400,1000",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def curve_pixels(png: Path, left: int = 360, top: int = 150) -> int:
    """Pixels of the first run's line colour outside the header and the run list: 0 for a page that drew
    no chart (a blank page, an error page, an empty dashboard)."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        px, (w, h) = rgb.load(), rgb.size
        r0, g0, b0 = TB_RUN_COLOUR
        return sum(
            1
            for x in range(left, w)
            for y in range(top, h)
            if abs(px[x, y][0] - r0) < 12 and abs(px[x, y][1] - g0) < 25 and abs(px[x, y][2] - b0) < 28
        )


def tensorboard_ready(env: Env, job: str, timeout: float = 300) -> client.V1Pod:
    """The pod the job's TensorBoard Service selects, once it is Ready."""
    svc = env.core.read_namespaced_service(tensorboard_service(job), env.namespace)
    selector = ",".join(f"{k}={v}" for k, v in (svc.spec.selector or {}).items())
    found: list[client.V1Pod] = []

    def ready() -> bool:
        found[:] = [
            p
            for p in env.core.list_namespaced_pod(env.namespace, label_selector=selector).items
            if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        ]
        return bool(found)

    wait_for(ready, timeout, desc=f"a Ready pod behind service {svc.metadata.name} ({selector})")
    return found[0]


def check_tensorboard(env: Env, job: str, out: Path) -> dict[str, Any]:
    """Port-forward the job's Service as docs/install.md says, read train/loss through the HTTP API and
    screenshot the scalars page; returns what a test asserts on."""
    pod = tensorboard_ready(env, job)
    with port_forward(env, f"svc/{tensorboard_service(job)}", TB_PORT) as port:
        steps = tensorboard_scalar_steps(port)
        screenshot(f"http://127.0.0.1:{port}/?darkMode=false#scalars", out)
    return {"pod": pod.metadata.name, "steps": steps, "png": str(out), "curve_pixels": curve_pixels(out)}


# --- Kueue on the real node: a priority preemption through the real Kueue (hack/cluster.sh kueue up) ---
KQ = "kueue.x-k8s.io"
KUEUE_QUEUE, KUEUE_LOW, KUEUE_HIGH = "e2e", "kubetune-e2e-low", "kubetune-e2e-high"


def kueue_up(env: Env) -> None:
    """Start Kueue on the scenario's cluster, turn the chart's kueue.enabled on, and make a ClusterQueue
    with room for one 1-CPU trainer (priority preemption inside it), its LocalQueue, a flavor that leads
    to the real node, and two WorkloadPriorityClasses."""
    env.cluster.sh("bash", "hack/cluster.sh", "kueue", "up", timeout=300)
    install_operator(env, kueue=True)
    cq = "kubetune-e2e"
    apply(
        env,
        {"apiVersion": f"{KQ}/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "real-node"},
         "spec": {"nodeLabels": {"kubetune.io/node-kind": "real"}}},
        {"apiVersion": f"{KQ}/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cq},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}},
                  "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [
                      {"name": "real-node", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                          {"name": "memory", "nominalQuota": "4Gi"}]}]}]}},
        {"apiVersion": f"{KQ}/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": KUEUE_QUEUE, "namespace": env.namespace}, "spec": {"clusterQueue": cq}},
        {"apiVersion": f"{KQ}/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": KUEUE_LOW},
         "value": 100},
        {"apiVersion": f"{KQ}/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": KUEUE_HIGH},
         "value": 1000},
    )  # fmt: skip


def kueue_down(env: Env, *jobs: str) -> None:
    """Delete `jobs` (their Workloads go with them), turn kueue.enabled off and stop Kueue (its CRDs go)."""
    for job in jobs:
        with contextlib.suppress(client.ApiException):
            env.custom.delete_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, job)
    wait_for(lambda: not any(trainer_pods(env, j) for j in jobs), 120, desc="the Kueue jobs' pods to go")
    install_operator(env, kueue=False)
    env.cluster.sh("bash", "hack/cluster.sh", "kueue", "down", timeout=300, check=False)


def queue_labels(priority: str) -> dict[str, str]:
    return {f"{KQ}/queue-name": KUEUE_QUEUE, f"{KQ}/priority-class": priority}


def workload_of(env: Env, job: str) -> dict[str, Any] | None:
    items = env.custom.list_namespaced_custom_object(KQ, "v1beta2", env.namespace, "workloads")["items"]
    for wl in items:
        if any(o.get("name") == job for o in wl["metadata"].get("ownerReferences") or []):
            return dict(wl)
    return None


def condition(wl: dict[str, Any] | None, kind: str) -> bool:
    conds = ((wl or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == kind and c["status"] == "True" for c in conds)


def latest_checkpoint(ckpt: Path) -> dict[str, Any] | None:
    """The newest durable checkpoint's manifest (step-N.json is written last, after the fsync'd rename):
    its `step` and `time` (when the trainer finished writing it)."""
    for m in sorted((ckpt / "checkpoints").glob("step-*.json"), reverse=True):
        with contextlib.suppress(OSError, ValueError):
            doc: dict[str, Any] = json.loads(m.read_text())
            return doc
    return None


@dataclass
class KueuePreemption:
    """When each stage of a Kueue preemption happened (time.time(); seen by 0.05 s polling on the host,
    except `stopped_at`, the container's finishedAt (whole seconds), and `durable_at`, the checkpoint
    manifest's time). Pod creation times are whole seconds too, so no figure is taken from them."""

    pod: str
    preemptor_created_at: float
    step_at_preemption: int | None
    evicted_at: float | None = None  # the low job's Workload is Evicted (Kueue chose it)
    durable_at: float | None = None  # the SIGTERM checkpoint is on the volume
    durable_step: int | None = None
    stopped_at: float | None = None
    exit_code: int | None = None
    queued_at: float | None = None  # the job says Queued
    readmitted_at: float | None = None  # its Workload is Admitted again (the preemptor finished)
    recovery: Disruption | None = None  # the next attempt's pod, start and first step

    def summary(self) -> dict[str, Any]:
        def d(a: float | None, b: float | None) -> float | None:
            return round(b - a, 2) if a is not None and b is not None else None

        r = self.recovery
        return {
            "pod": self.pod,
            "exit_code": self.exit_code,
            "step_at_preemption": self.step_at_preemption,
            "checkpoint_step": self.durable_step,
            "resumed_from": r.resumed_from if r else None,
            "preemptor_to_eviction_s": d(self.preemptor_created_at, self.evicted_at),
            "eviction_to_checkpoint_durable_s": d(self.evicted_at, self.durable_at),
            "eviction_to_queued_s": d(self.evicted_at, self.queued_at),
            "eviction_to_exit_s": d(self.evicted_at, self.stopped_at),
            "readmitted_to_first_step_s": d(self.readmitted_at, r.next_first_step_at if r else None),
        }


def kueue_preempt(
    env: Env, low: str, low_ckpt: Path, high: str, min_progress: int, log: Callable[[str], None]
) -> KueuePreemption:
    """Once `low` (admitted, training) made `min_progress` steps, create `high`, a short job of a higher
    WorkloadPriorityClass that needs the same quota: Kueue evicts `low`. Follow `low` through its graceful
    stop, back to Queued, to its re-admission once `high` succeeded, and to its next attempt's first step."""
    pod = wait_for(lambda: running_trainer(env, low), 300, desc=f"a running trainer of {low}")
    first = wait_for(lambda: trainer_step(pod), 300, desc="the trainer's metrics")
    wait_for(lambda: (trainer_step(pod) or 0) >= first + min_progress, 300, desc=f"{min_progress} steps")
    attempt = int(pod.metadata.labels.get(LABEL_ATTEMPT, "0"))
    step = trainer_step(pod)
    create_job(env, high, 30, 10, labels=queue_labels(KUEUE_HIGH))
    kp = KueuePreemption(pod.metadata.name, time.time(), step)
    log(f"kueue: {high} ({KUEUE_HIGH}) created while {pod.metadata.name} is at step {step}")
    deadline = time.monotonic() + 300
    while None in (kp.evicted_at, kp.durable_at, kp.queued_at, kp.stopped_at):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kueue preemption of {low} did not complete: {kp}")
        now = time.time()
        if kp.evicted_at is None and condition(workload_of(env, low), "Evicted"):
            kp.evicted_at = now
        if kp.queued_at is None and env.status(low).get("phase") == "Queued":
            kp.queued_at = now
        if kp.pod in env.terminations.seen:
            kp.exit_code, kp.stopped_at = env.terminations.seen[kp.pod]
            m = latest_checkpoint(low_ckpt)  # the trainer has exited: its last checkpoint is the SIGTERM one
            if m is not None:
                kp.durable_at, kp.durable_step = float(m["time"]), int(m["step"])
        time.sleep(0.05)
    log(f"  -> evicted, checkpoint at step {kp.durable_step}, exit {kp.exit_code}, Queued")
    kp.recovery = Disruption("kueue-preemption", kp.pod, attempt, kp.evicted_at or 0.0, step)

    def readmitted() -> bool:
        wl = workload_of(env, low)
        return condition(wl, "Admitted") and not condition(wl, "Evicted")

    kp.readmitted_at = wait_for(lambda: readmitted() and time.time(), 600, interval=0.05, desc="re-admission")
    follow_recovery(env, low, kp.recovery)
    log(f"  -> re-admitted; {kp.recovery.next_pod} resumed at step {kp.recovery.resumed_from}")
    return kp


# --- cluster DNS (CoreDNS, hack/real-node.sh): what a pod resolves ---------------------------------------
def dns_probe(env: Env, names: list[str], missing: list[str], timeout: float = 120) -> dict[str, Any]:
    """Run a pod (the trainer image, as `probe` under a headless Service `probe-dns`, the way the
    operator names workers) that resolves `names` and then `missing` (names that must not exist, asked
    once) from inside it; returns its own IP, its resolv.conf and what each name resolved to (or the
    error)."""
    svc, pod = "probe-dns", "probe"
    for kind, name in (("pod", pod), ("service", svc)):
        env.cluster.sh(str(BIN / "kubectl"), "-n", env.namespace, "delete", kind, name, "--ignore-not-found",
                       "--grace-period=0", "--wait=true", timeout=120)  # fmt: skip
    # Each of `names` is retried for up to 30 s, as torchrun's rendezvous retries: a pod's own record
    # appears once the EndpointSlice controller has published its IP, moments after it starts.
    script = (
        "import json, socket, sys, time\n"
        "out = {'resolv': open('/etc/resolv.conf').read(), 'names': {}}\n"
        "split = sys.argv.index('--')\n"
        "for i, n in enumerate(sys.argv[1:split] + sys.argv[split + 1:], 1):\n"
        "    deadline = time.monotonic() + (30 if i < split else 0)\n"
        "    while True:\n"
        "        try:\n"
        "            out['names'][n] = sorted({a[4][0] for a in socket.getaddrinfo(n, None, socket.AF_INET)})\n"
        "            break\n"
        "        except OSError as e:\n"
        "            out['names'][n] = str(e)\n"
        "            if time.monotonic() > deadline:\n"
        "                break\n"
        "            time.sleep(0.5)\n"
        "print('DNS ' + json.dumps(out))\n"
    )
    apply(
        env,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc, "namespace": env.namespace},
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"kubetune.io/probe": "dns"},
                  "ports": [{"name": "x", "port": 1}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": pod, "namespace": env.namespace, "labels": {"kubetune.io/probe": "dns"}},
         "spec": {"hostname": pod, "subdomain": svc, "restartPolicy": "Never",
                  "nodeSelector": {"kubetune.io/node-kind": "real"},
                  "containers": [{"name": "probe", "image": image_ref("trainer"),
                                  "command": ["python", "-c", script, *names, "--", *missing],
                                  "resources": {"requests": {"cpu": "50m"}}}]}},
    )  # fmt: skip
    wait_for(lambda: _phase(env, pod) in ("Succeeded", "Failed"), timeout, desc="the DNS probe pod to finish")
    logs = env.core.read_namespaced_pod_log(pod, env.namespace)
    line = next((ln for ln in logs.splitlines() if ln.startswith("DNS ")), None)
    assert line is not None, logs
    out: dict[str, Any] = json.loads(line[4:])
    out["pod_ip"] = env.core.read_namespaced_pod(pod, env.namespace).status.pod_ip
    return out
