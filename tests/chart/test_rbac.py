"""RBAC proven by use: the operator runs with a token of the chart's ServiceAccount (installed by helm
into the real control plane) and drives a job through creation, an eviction, a replacement pod and
success; its log shows no permission error. And `kubectl auth can-i --list` for that ServiceAccount shows
nothing beyond what the operator uses.

The operator process watches one namespace (tests/opkit.OperatorProcess). With the chart's default
(cluster-wide) RBAC the real Deployment runs --all-namespaces, which this shared test cluster cannot host
(it would reconcile other tests' jobs); there kopf skips namespace discovery, so the one permission
warning allowed in that variant is kopf's "list namespaces" fallback, which the namespaced variant
(granting namespaces list/watch) shows is then silent.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from conftest import CHART, Helm
from kubeutil import NotYet, dedicated_toleration, patch_pod_terminated, wait_for
from opkit import OperatorProcess, apply, job_manifest

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
# What every authenticated identity may do (system:basic-user, system:discovery,
# system:public-info-viewer): not granted by the chart.
BUILTIN = {
    "selfsubjectreviews.authentication.k8s.io": "create",
    "selfsubjectaccessreviews.authorization.k8s.io": "create",
    "selfsubjectrulesreviews.authorization.k8s.io": "create",
}
NAMESPACED = {
    ("finetunejobs.kubetune.io", ""): {"get", "list", "watch", "delete"},
    ("finetunejobs.kubetune.io/status", ""): {"patch"},
    ("pods", ""): {"get", "list", "watch", "create", "delete"},
    ("persistentvolumeclaims", ""): {"get", "list", "watch", "create"},
    ("configmaps", ""): {"get", "list", "watch", "create", "update"},
    ("services", ""): {"list", "watch", "create", "delete"},
    ("events", ""): {"list", "create"},
}
CLUSTER = {
    ("nodes", ""): {"get"},
    ("customresourcedefinitions.apiextensions.k8s.io", ""): {"list", "watch"},
}
NAMESPACES = {("namespaces", ""): {"list", "watch"}}


def lease_rules(lease: str) -> dict[tuple[str, str], set[str]]:
    return {
        ("leases.coordination.k8s.io", ""): {"create"},
        ("leases.coordination.k8s.io", lease): {"get", "update"},
    }


def can_i_list(kube: Any, sa: str, namespace: str) -> dict[tuple[str, str], set[str]]:
    """`kubectl auth can-i --list` for the ServiceAccount in `namespace`, as {(resource, name): verbs},
    without the built-in self-review rules and non-resource URLs every identity has."""
    out = kube.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={sa}").stdout
    rules: dict[tuple[str, str], set[str]] = {}
    for line in out.splitlines()[1:]:
        if line.strip().startswith("["):
            continue  # a non-resource URL (/api/*, /healthz...): discovery, granted to everyone
        m = re.match(r"^(\S+)\s+(\[[^\]]*\])\s+(\[[^\]]*\])\s+(\[[^\]]*\])\s*$", line.strip())
        assert m, line
        resource, urls, names, verbs = m.groups()
        if resource == "" or urls != "[]" or resource in BUILTIN:
            continue
        key = (resource, names.strip("[]"))
        rules.setdefault(key, set()).update(verbs.strip("[]").split())
    return rules


def token_kubeconfig(kube: Any, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig authenticating as the ServiceAccount with a short-lived bound token."""
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in cluster:  # inline the CA so the file stands alone
        ca = Path(cluster.pop("certificate-authority"))
        ca = ca if ca.is_absolute() else Path(kube.kubeconfig).parent / ca
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def sends_token(kubeconfig: Path) -> bool:
    """Whether the operator's API client (and kopf login) put the kubeconfig's bearer token on requests."""
    from kubetune_operator.kube import Kube, load_configuration

    return "Authorization" in Kube(load_configuration(str(kubeconfig)))._headers("application/json")


def report(reason: str, step: int, ckpt: int, total: int = 100) -> str:
    """The trainer's termination message (see tests/controller)."""
    return json.dumps(
        {"reason": reason, "step": step, "totalSteps": total, "epoch": 0,
         "checkpoint": f"/checkpoints/step-{ckpt}", "checkpointStep": ckpt, "message": ""}
    )  # fmt: skip


@pytest.mark.parametrize("scope", ["namespaced", "clusterwide"])
def test_operator_runs_with_the_chart_service_account(
    kube: Any, helm: Helm, crd: None, namespace: str, extra_namespaces: Any, api_client: Any, core_v1: Any,
    kwok_node: Any, bound_volume: Any, tmp_path: Path, scope: str,
) -> None:  # fmt: skip
    release = f"kt{secrets.token_hex(3)}"
    fullname = f"{release}-kubetune"
    values = {"image": {"repository": "registry.invalid/kubetune/operator"}}
    if scope == "namespaced":
        values["watchNamespaces"] = [namespace]
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    helm.run("install", release, str(CHART), "-n", namespace, "-f", str(vf), kubeconfig=kube.kubeconfig)
    try:
        sa = f"system:serviceaccount:{namespace}:{fullname}"

        # 1. What the ServiceAccount may do, as the API server's authorizer reports it.
        expected = {**NAMESPACED, **CLUSTER, **lease_rules(fullname)}
        if scope == "namespaced":
            expected.update(NAMESPACES)
        assert can_i_list(kube, sa, namespace) == expected
        other = extra_namespaces("other")
        outside = {**CLUSTER, **(NAMESPACES if scope == "namespaced" else NAMESPACED)}
        assert can_i_list(kube, sa, other) == outside
        assert (
            kube.kubectl(
                "auth", "can-i", "get", "secrets", "-n", namespace, f"--as={sa}", check=False
            ).stdout.strip()
            == "no"
        )

        # 2. The operator with that token: job -> pod -> eviction -> replacement -> success.
        kubeconfig = token_kubeconfig(kube, namespace, fullname, tmp_path / "sa.kubeconfig")
        assert sends_token(kubeconfig), "the operator must authenticate with the ServiceAccount's token"
        op = OperatorProcess(
            kubeconfig, namespace, tmp_path / "operator.log", "--leader-name", fullname
        ).start()
        try:
            bound_volume(namespace, "ft-ckpt")
            scenario(kube, api_client, core_v1, namespace, fullname, kwok_node())
        finally:
            op.stop()
        log = op.log_path.read_text(errors="replace")
        denied = [ln for ln in log.splitlines() if re.search(r"403|[Ff]orbidden|Not enough permissions", ln)]
        if scope == "clusterwide":
            # kopf's namespace observer only runs for a namespace-scoped operator; the chart's
            # cluster-wide mode (--all-namespaces) never lists namespaces.
            assert all(
                re.search(
                    r"GET \S+/api/v1/namespaces(\?\S*)? ->|permissions to (list|watch for) namespaces", ln
                )
                for ln in denied
            ), denied
        else:
            assert denied == [], denied
        assert "became leader" in log
    finally:
        helm.run("uninstall", release, "-n", namespace, "--wait", kubeconfig=kube.kubeconfig)


def scenario(kube: Any, api_client: Any, core_v1: Any, ns: str, lease: str, node: str) -> None:
    """On a dedicated fake GPU node, so other tests filling the shared nodes cannot starve it."""
    custom = client.CustomObjectsApi(api_client)

    def status(pred: Any, desc: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> Any:
            st = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "ft").get("status") or {}
            return st if pred(st) else NotYet(json.dumps(st)[:800])

        return wait_for(check, timeout=timeout, desc=f"ft: {desc}")

    def running(name: str) -> Any:
        def check() -> Any:
            pods = core_v1.list_namespaced_pod(ns, field_selector=f"metadata.name={name}").items
            if pods and pods[0].status.phase == "Running":
                return pods[0]
            return NotYet(
                [(p.status.phase, [(c.type, c.message) for c in p.status.conditions or []]) for p in pods]
            )

        return wait_for(check, timeout=60, desc=f"pod {name} Running")

    placement = {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [dedicated_toleration(node)],
    }
    board = {"serve": True}  # the TensorBoard Service and pods: services create/delete
    apply(kube, ns, job_manifest("ft", runPolicy={"backoffLimit": 0}, tensorboard=board, **placement))
    pod = running("ft-a1-0")  # created by the operator: pods create, configmaps create, pvc get/create
    assert pod.metadata.owner_references[0].kind == "FineTuneJob"
    status(lambda s: s.get("phase") == "Running", "Running")  # finetunejobs/status patch
    core_v1.create_namespaced_pod_eviction("ft-a1-0", ns, {"metadata": {"name": "ft-a1-0", "namespace": ns}})
    st = status(lambda s: s.get("preemptions") == 1, "one preemption")
    assert st["preemptionsByReason"] == {"EvictionByEvictionAPI": 1}
    running("ft-a2-0")  # the replacement
    status(lambda s: s.get("phase") == "Running" and s.get("attempt", 2) == 2, "Running again")
    patch_pod_terminated(core_v1, ns, "ft-a2-0", 0, "Completed", message=report("Completed", 100, 100))
    status(lambda s: s.get("phase") == "Succeeded", "Succeeded")
    running("ft-tensorboard")  # the standalone TensorBoard pod, once the trainer pod stopped
    kube.kubectl(
        "patch", "ftj", "ft", "-n", ns, "--type=merge", "-p", '{"spec":{"tensorboard":{"serve":false}}}'
    )

    def board_removed() -> Any:
        names = [s.metadata.name for s in core_v1.list_namespaced_service(ns).items]
        return "ft-tensorboard" not in names or NotYet(names)

    wait_for(board_removed, timeout=60, desc="the TensorBoard Service deleted (services delete)")
    reasons = {
        e.reason for e in core_v1.list_namespaced_event(ns, field_selector="involvedObject.name=ft").items
    }
    assert reasons, "the operator's Events were written (events create)"
    held = client.CoordinationV1Api(api_client).read_namespaced_lease(lease, ns)
    assert held.spec.holder_identity, "the operator held the chart's Lease (leases create/get/update)"


@pytest.mark.unit
def test_operator_client_sends_a_bearer_token(tmp_path: Path) -> None:
    """A kubeconfig with a token (what `kubectl create token` gives, and what in-cluster config loads)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    assert sends_token(path)
