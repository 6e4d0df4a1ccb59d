"""Kueue's own CRDs and webhook configurations, pointed at a manager process on 127.0.0.1.

Upstream's kustomize overlay (config/default) points the conversion and admission webhooks at the
`kueue-webhook-service` Service in `kueue-system`; the local cluster has no such Service (the manager is a
host process), so this swaps every `clientConfig.service` for `clientConfig.url` plus the CA that signed
the manager's serving certificate. It keeps only the webhooks for Kueue's own API group: the job
integrations' webhooks (batch/v1 Job, Pod, Deployment, ...) would make every pod create in the cluster
depend on this process, and kubetune's FineTuneJob is an external framework that needs none of them.

    python hack/kueue_manifests.py CRD_DIR WEBHOOK_YAML URL CA_FILE > kueue.yaml
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import yaml

GROUP = "kueue.x-k8s.io"
# config/components/crd/kustomization.yaml enables the conversion webhook for these (v1beta1 <-> v1beta2).
CONVERTED = {"localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"}
NAME_PREFIX = "kueue-"  # config/default's namePrefix


def crds(crd_dir: Path, url: str, ca: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(crd_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["names"]["plural"] in CONVERTED:
            doc["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{url}/convert", "caBundle": ca},
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(doc)
    return out


def webhooks(webhook_yaml: Path, url: str, ca: str) -> list[dict[str, Any]]:
    out = []
    for doc in yaml.safe_load_all(webhook_yaml.read_text()):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks") or []:
            if not any(GROUP in (r.get("apiGroups") or []) for r in hook.get("rules") or []):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": ca}
            kept.append(hook)
        doc["metadata"] = {"name": NAME_PREFIX + doc["metadata"]["name"]}
        doc["webhooks"] = kept
        out.append(doc)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    crd_dir, webhook_yaml, url, ca_file = Path(argv[1]), Path(argv[2]), argv[3].rstrip("/"), Path(argv[4])
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    docs = crds(crd_dir, url, ca) + webhooks(webhook_yaml, url, ca)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
