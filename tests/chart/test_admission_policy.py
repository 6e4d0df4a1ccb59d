"""The chart's ValidatingAdmissionPolicy on the real API server, as a user who may create FineTuneJobs
and nothing else (`alice`, by impersonation): what a FineTuneJob may ask the operator to run.

Creating a FineTuneJob makes the operator create pods: without the policy, alice could run any image
under any ServiceAccount of her namespace. The release is installed with watchNamespaces set to the test's
namespace, so its binding never touches the FineTuneJobs of tests running beside it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CHART, Helm
from kubetune_operator import builders
from kubetune_operator.api import parse_job
from kubeutil import NotYet, wait_for

pytestmark = pytest.mark.cluster

USER = "alice"
DEFAULT_TRAINER = "ghcr.io/kubetune/kubetune-trainer:0.1.0"  # the chart's trainer.image at appVersion
ALLOWED_PREFIX = "registry.example.com/ml/"


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"model": {"name": "test_resnet", "numClasses": 10}, "data": {"format": "synthetic"}, **spec},
    }


def create(kube: Any, namespace: str, doc: dict[str, Any], *extra: str, user: str | None = USER) -> Any:
    who = (f"--as={user}",) if user else ()
    return kube.kubectl(
        "create", *who, "-n", namespace, "-o", "name", "-f", "-", *extra, input=json.dumps(doc), check=False
    )


def admitted(out: Any) -> bool:
    return out.returncode == 0


def denied_by_policy(out: Any) -> bool:
    return out.returncode != 0 and "ValidatingAdmissionPolicy" in out.stderr


def helm_values(tmp_path: Path, namespace: str, **admission: Any) -> Path:
    values = {
        "image": {"repository": "registry.invalid/kubetune/operator"},  # kwok never pulls it
        "watchNamespaces": [namespace],
        "admission": admission,
    }
    path = tmp_path / f"values-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def wait_type_checked(kube: Any, policy: str) -> dict[str, Any]:
    """The API server type-checks the policy's CEL against the CRD's schema asynchronously."""

    def checked() -> Any:
        vap = json.loads(kube.kubectl("get", "validatingadmissionpolicy", policy, "-o", "json").stdout)
        status = vap.get("status") or {}
        done = status.get("observedGeneration") == vap["metadata"]["generation"]
        return status if done else NotYet(status)

    return wait_for(checked, timeout=60, desc=f"ValidatingAdmissionPolicy {policy} type-checked")


def wait_denied(kube: Any, namespace: str, doc: dict[str, Any]) -> Any:
    """Poll with a server-side dry run until the binding takes effect (it is picked up asynchronously)."""

    def denied() -> Any:
        out = create(kube, namespace, doc, "--dry-run=server")
        return out if denied_by_policy(out) else NotYet((out.returncode, out.stdout, out.stderr))

    return wait_for(denied, timeout=60, interval=0.5, desc="the admission policy to deny")


@pytest.fixture
def alice(kube: Any, namespace: str) -> str:
    """alice may create FineTuneJobs in the namespace, and do nothing else there."""
    rbac = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "finetunejob-creator", "namespace": namespace},
            "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"], "verbs": ["create"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "finetunejob-creator", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "finetunejob-creator",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
        },
    ]
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))

    def can(verb: str, resource: str) -> str:
        args = ("auth", "can-i", verb, resource, "-n", namespace, f"--as={USER}")
        return kube.kubectl(*args, check=False).stdout.strip()

    wait_for(lambda: can("create", "finetunejobs.kubetune.io") == "yes", timeout=30, desc="alice's Role")
    assert [can("create", "pods"), can("get", "finetunejobs.kubetune.io")] == ["no", "no"]
    return USER


def test_finetunejobs_may_run_only_allowed_service_accounts_and_images(
    kube: Any, helm: Helm, crd: None, namespace: str, extra_namespaces: Any, alice: str, tmp_path: Path
) -> None:
    # A powerful ServiceAccount alice must not reach through a FineTuneJob, and a job that names it,
    # created by an admin before the policy existed.
    kube.kubectl("create", "serviceaccount", "builder", "-n", namespace)
    assert admitted(create(kube, namespace, job("legacy", serviceAccountName="builder"), user=None))

    release = f"kt{secrets.token_hex(3)}"
    policy = f"{release}-kubetune-finetunejobs"
    helm.run("install", release, str(CHART), "-n", namespace, "-f", str(helm_values(tmp_path, namespace)),
             kubeconfig=kube.kubeconfig)  # fmt: skip
    try:
        status = wait_type_checked(kube, policy)
        assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status

        # (a) Another ServiceAccount is denied, and the message names the field and the chart value.
        out = wait_denied(kube, namespace, job("as-builder", serviceAccountName="builder"))
        assert "spec.serviceAccountName" in out.stderr and '"builder"' in out.stderr, out.stderr
        assert "admission.allowedServiceAccounts" in out.stderr, out.stderr
        # The default ServiceAccount, named or not, is admitted; so is any image while no prefix is set.
        for doc in (
            job("plain"),
            job("named-default", serviceAccountName="default"),
            job("own-image", image="docker.io/someone/trainer:1"),
        ):
            out = create(kube, namespace, doc)
            assert admitted(out), out.stderr
        # The operator builds alice's pods without a ServiceAccount token.
        stored = json.loads(kube.kubectl("get", "ftj", "plain", "-n", namespace, "-o", "json").stdout)
        pod = builders.trainer_pod(parse_job(stored, default_image=DEFAULT_TRAINER), 1, 0)["spec"]
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod

        # Updates: an unchanged ServiceAccount is admitted (kopf patches finalizers and annotations onto
        # jobs admitted before), a new disallowed one is not, even for an admin.
        label = kube.kubectl("label", "ftj", "legacy", "-n", namespace, "team=ml", check=False)
        assert admitted(label), label.stderr
        swap = kube.kubectl(
            "patch", "ftj", "plain", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"serviceAccountName": "builder"}}), check=False,
        )  # fmt: skip
        assert denied_by_policy(swap) and "spec.serviceAccountName" in swap.stderr, swap.stderr
        # The binding covers the release's watchNamespaces only.
        other = extra_namespaces("other")
        out = create(
            kube, other, job("elsewhere", serviceAccountName="builder"), "--dry-run=server", user=None
        )
        assert admitted(out), out.stderr

        # (b) With allowedImagePrefixes, images from elsewhere are denied; the prefix and the operator's
        # default trainer image (unset spec.image, or named) are admitted.
        values = helm_values(tmp_path, namespace, allowedImagePrefixes=[ALLOWED_PREFIX])
        helm.run(
            "upgrade", release, str(CHART), "-n", namespace, "-f", str(values), kubeconfig=kube.kubeconfig
        )
        out = wait_denied(kube, namespace, job("miner", image="docker.io/evil/miner:1"))
        assert "spec.image" in out.stderr and "docker.io/evil/miner:1" in out.stderr, out.stderr
        assert "admission.allowedImagePrefixes" in out.stderr and ALLOWED_PREFIX in out.stderr, out.stderr
        status = wait_type_checked(kube, policy)
        assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status
        lookalike = create(kube, namespace, job("lookalike", image="registry.example.com/ml-evil/x:1"))
        assert denied_by_policy(lookalike), lookalike.stderr
        for doc in (
            job("allowed", image=f"{ALLOWED_PREFIX}trainer:2"),
            job("default-image"),
            job("named-default-image", image=DEFAULT_TRAINER),
        ):
            out = create(kube, namespace, doc)
            assert admitted(out), out.stderr
        # Both rules hold at once: an allowed image does not carry a disallowed ServiceAccount.
        both = create(
            kube, namespace, job("both", image=f"{ALLOWED_PREFIX}t:1", serviceAccountName="builder")
        )
        assert denied_by_policy(both) and "spec.serviceAccountName" in both.stderr, both.stderr
    finally:
        helm.run(
            "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", kubeconfig=kube.kubeconfig
        )
    assert kube.kubectl("get", "validatingadmissionpolicy", policy, check=False).returncode != 0
