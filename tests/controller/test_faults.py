"""The operator under faults, on the real control plane: a watch gap, specs the API server refuses when
the pods are created, spec edits between attempts, and a preemption storm that must never make a twin."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from test_operator import events, get_job, pod_names, running_job, wait_pod, wait_status

from kubeutil import (
    CLUSTER_SH,
    create_kwok_node,
    dedicated_toleration,
    delete_node_if_exists,
    fake_pod,
    holds_for,
    wait_for,
)
from opkit import apply, job_manifest

pytestmark = pytest.mark.cluster
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


def _etcd_url() -> str:
    base = int(os.environ.get("KUBETUNE_PORT_BASE", "23790"))
    return f"http://127.0.0.1:{base}"


def _etcd_delete(key: str) -> int:
    """Delete a key straight from etcd (its JSON gateway): how an object vanishes while no apiserver runs."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    req = urllib.request.Request(f"{_etcd_url()}/v3/kv/deleterange", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(json.load(resp).get("deleted") or 0)


def _apiserver(action: str) -> None:
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), "apiserver", action], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_a_pod_that_vanished_while_the_apiserver_was_down_is_replaced_within_seconds(
    kube, operator, custom, core_v1, namespace
):
    """The apiserver restarts with a fresh watch cache, so the operator's pod watch gets 410 Gone and re-lists;
    the re-list has no DELETED for the pod that vanished in the gap. The informer must notice it anyway."""
    if not kube.local:
        pytest.skip("stops the local cluster's apiserver")
    running_job(kube, custom, core_v1, namespace, runPolicy={"backoffLimit": 0})
    _apiserver("stop")
    try:
        assert _etcd_delete(f"/registry/pods/{namespace}/ft-a1-0") == 1
        time.sleep(3)  # the operator's watch is broken and retrying
    finally:
        _apiserver("start")
    back = time.monotonic()
    wait_for(lambda: "ft-a2-0" in pod_names(core_v1, namespace), timeout=30, desc="replacement after the gap")
    took = time.monotonic() - back
    st = wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "the gap counted once")
    assert st["failures"] == 0 and st["attempt"] == 2
    assert took < 15, f"replacement took {took:.1f}s after the apiserver came back"
    print(f"watch gap: replacement created {took:.2f}s after the apiserver was ready again")


def test_a_spec_edit_between_attempts_reaches_the_next_attempt(kube, operator, custom, core_v1, namespace):
    """checkpoint.everySteps can change at any time: the next attempt's trainer config carries the new value."""
    running_job(kube, custom, core_v1, namespace, checkpoint={"everySteps": 50})

    def every_steps() -> int:
        cm = core_v1.read_namespaced_config_map("ft-job", namespace)
        return int(yaml.safe_load(cm.data["job.yaml"])["spec"]["checkpoint"]["everySteps"])

    assert every_steps() == 50
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "ft", {"spec": {"checkpoint": {"everySteps": 7}}}
    )
    core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)
    wait_pod(core_v1, namespace, "ft-a2-0")
    assert every_steps() == 7


REFUSED = [
    # (case, spec overrides, the job field the status must name, Failed at once?)
    ("missing PriorityClass", {"priorityClassName": "no-such-class"}, "spec.priorityClassName", False),
    ("missing ServiceAccount", {"serviceAccountName": "no-such-sa"}, "spec.serviceAccountName", False),
    ("bad affinity", {"affinity": {"nodeAffinity": "notanobject"}}, "", True),
]


@pytest.mark.parametrize(("case", "spec", "field", "fails"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_spec_the_api_refuses_at_pod_creation_says_so_once(
    kube, operator, custom, core_v1, namespace, case, spec, field, fails
):
    apply(kube, namespace, job_manifest("ft", **spec))
    if fails:
        st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Failed", "Failed")
        assert "the API server refused Pod ft-a1-0" in st["message"] and "HTTP 400" in st["message"]
    else:
        st = wait_status(
            custom, namespace, "ft",
            lambda s: any(c["type"] == "Blocked" and c["status"] == "True" for c in s.get("conditions") or []),
            "Blocked",
        )  # fmt: skip
        assert st["phase"] == "Pending" and field in st["message"] and "HTTP 403" in st["message"]
    assert st.get("failures", 0) == 0 and st.get("preemptions", 0) == 0
    assert pod_names(core_v1, namespace) == []

    # Retries (backoff base 1 s in tests) must not add Events or count anything.
    def one_refusal() -> bool:
        refusals = [r for r, _ in events(core_v1, namespace, "ft") if r in ("CreateRefused", "InvalidSpec")]
        return len(refusals) == 1

    holds_for(one_refusal, 4, desc="exactly one refusal Event")
    st = get_job(custom, namespace, "ft")["status"]
    assert st.get("failures", 0) == 0 and st.get("preemptions", 0) == 0


def test_a_blocked_job_starts_once_the_missing_object_exists(kube, operator, custom, core_v1, namespace):
    apply(kube, namespace, job_manifest("ft", serviceAccountName="trainer"))
    wait_status(
        custom, namespace, "ft", lambda s: "spec.serviceAccountName" in s.get("message", ""), "Blocked"
    )
    core_v1.create_namespaced_service_account(namespace, {"metadata": {"name": "trainer"}})
    wait_pod(core_v1, namespace, "ft-a1-0", timeout=60)
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Running", "Running")
    blocked = next(c for c in st["conditions"] if c["type"] == "Blocked")
    assert blocked["status"] == "False" and st.get("failures", 0) == 0


APPLY_REJECTED = [
    ("digit-first name with workers 2", "1job", {"workers": 2}, "metadata.name"),
    ("dotted name with workers 2", "a.b", {"workers": 2}, "metadata.name"),
    ("image with whitespace", "ft", {"image": " x"}, "spec.image"),
    ("nodeSelector value with a space", "ft", {"nodeSelector": {"disk": "a b"}}, "spec.nodeSelector"),
    (
        "bad podTemplate label key",
        "ft",
        {"podTemplate": {"labels": {"bad key": "v"}}},
        "spec.podTemplate.labels",
    ),
    (
        "bad annotation key",
        "ft",
        {"podTemplate": {"annotations": {"-x": "v"}}},
        "spec.podTemplate.annotations",
    ),
    ("bad toleration key", "ft", {"tolerations": [{"key": "a b", "operator": "Exists"}]}, "spec.tolerations"),
]


@pytest.mark.parametrize(
    ("case", "name", "spec", "field"), APPLY_REJECTED, ids=[c[0] for c in APPLY_REJECTED]
)
def test_specs_kubernetes_would_refuse_are_rejected_at_apply(kube, crd, namespace, case, name, spec, field):
    proc = kube.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(job_manifest(name, **spec)), check=False
    )
    assert proc.returncode != 0, f"{case}: accepted"
    assert field in proc.stderr, proc.stderr


def test_a_long_name_cut_on_a_dot_still_makes_valid_children(kube, operator, custom, core_v1, namespace):
    name = "a" * 45 + "." + "b" * 23  # 69 characters; a 63-character cut falls just after the dot
    apply(kube, namespace, job_manifest(name))
    st = wait_status(custom, namespace, name, lambda s: s.get("phase") == "Running", "Running")
    assert st.get("failures", 0) == 0
    (pod,) = core_v1.list_namespaced_pod(namespace).items
    assert ".-" not in pod.metadata.name and ".-" not in pod.metadata.labels["kubetune.io/job-name"]


def test_no_twin_when_every_first_pod_is_preempted_the_moment_it_runs(
    kube, operator, custom, core_v1, namespace
):
    """A storm of deletions of each job's newest pod the moment it is Running: every pod name is created
    exactly once (a watch sees every ADDED) and the counts are exact."""
    jobs, rounds = 20, 10  # 200 preemptions
    for i in range(jobs):
        apply(kube, namespace, job_manifest(f"s{i}", runPolicy={"backoffLimit": 0}))
    added: dict[str, int] = {}
    stop = threading.Event()

    def watch_pods() -> None:
        w = watch.Watch()
        for ev in w.stream(core_v1.list_namespaced_pod, namespace, timeout_seconds=300):
            if ev["type"] == "ADDED":
                name = ev["object"].metadata.name
                added[name] = added.get(name, 0) + 1
            if stop.is_set():
                w.stop()

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    deleted = 0
    for r in range(1, rounds + 1):
        for i in range(jobs):
            pod = wait_pod(core_v1, namespace, f"s{i}-a{r}-0", timeout=60)
            try:
                core_v1.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
                deleted += 1
            except ApiException as exc:
                assert exc.status == 404
    for i in range(jobs):
        st = wait_status(custom, namespace, f"s{i}", lambda s: s.get("preemptions") == rounds, "all counted")
        assert st["failures"] == 0 and st["attempt"] == rounds + 1
    wait_for(lambda: all(f"s{i}-a{rounds + 1}-0" in added for i in range(jobs)), timeout=30, desc="last pods")
    stop.set()
    twins = {n: c for n, c in added.items() if c > 1}
    assert twins == {}, twins
    assert deleted == jobs * rounds


def _blocked(s: dict) -> bool:
    return any(c["type"] == "Blocked" and c["status"] == "True" for c in s.get("conditions") or [])


def test_a_configmap_that_is_not_the_jobs_is_never_overwritten(kube, operator, custom, core_v1, namespace):
    """A user who may only create FineTuneJobs must not get the operator to replace another ConfigMap."""
    core_v1.create_namespaced_config_map(namespace, {"metadata": {"name": "ft-job"}, "data": {"keep": "me"}})
    apply(kube, namespace, job_manifest("ft"))
    st = wait_status(custom, namespace, "ft", _blocked, "Blocked")
    assert "ConfigMap ft-job" in st["message"] and "not this job's" in st["message"]
    cm = core_v1.read_namespaced_config_map("ft-job", namespace)
    assert cm.data == {"keep": "me"} and not cm.metadata.owner_references
    assert pod_names(core_v1, namespace) == []


def test_a_pod_name_taken_by_another_owner_waits_then_starts(kube, operator, custom, core_v1, namespace):
    """A job re-created under the name of one whose pod is still going: the name is taken by a pod that is
    not this job's. That is a wait (Blocked, nothing counted), never a success or a false preemption."""
    core_v1.create_namespaced_pod(namespace, fake_pod("ft-a1-0"))
    apply(kube, namespace, job_manifest("ft", runPolicy={"maxPreemptions": 0}))
    st = wait_status(custom, namespace, "ft", _blocked, "Blocked")
    assert "pod of the same name" in st["message"] and st["preemptions"] == 0 and st["failures"] == 0
    core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)

    def owned() -> bool:
        try:
            return bool(core_v1.read_namespaced_pod("ft-a1-0", namespace).metadata.owner_references)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    wait_for(owned, timeout=60, desc="the job's own ft-a1-0")
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Running", "Running")
    assert st["preemptions"] == 0 and st["failures"] == 0


def test_a_preemption_while_the_operator_was_down_keeps_its_reason(
    kube, start_operator, custom, core_v1, namespace
):
    """The pod and its DisruptionTarget condition are gone when the operator comes back; the scheduler's
    Preempted Event on the pod is what is left, and it names the cause."""
    node = f"kwok-down-{namespace[-6:]}"
    sched = client.SchedulingV1Api(core_v1.api_client)
    low, high = f"low-{namespace[-6:]}", f"high-{namespace[-6:]}"
    sched.create_priority_class({"metadata": {"name": low}, "value": 100})
    sched.create_priority_class({"metadata": {"name": high}, "value": 100000})
    create_kwok_node(core_v1, node, gpus=8)
    placed = {"nodeSelector": {"kubernetes.io/hostname": node}, "tolerations": [dedicated_toleration(node)]}
    try:
        op = start_operator()
        running_job(kube, custom, core_v1, namespace, resources={"gpus": 8}, priorityClassName=low, **placed)
        op.stop(signal.SIGKILL)
        core_v1.create_namespaced_pod(namespace, fake_pod("hog", gpus=8, priorityClassName=high, **placed))
        wait_for(lambda: "ft-a1-0" not in pod_names(core_v1, namespace), timeout=30, desc="victim gone")
        start_operator()
        st = wait_status(
            custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "counted after restart"
        )
        assert st["preemptionsByReason"] == {"PreemptionByScheduler": 1} and st["failures"] == 0
    finally:
        delete_node_if_exists(core_v1, node)
        sched.delete_priority_class(low)
        sched.delete_priority_class(high)
