"""The one place that talks to the Kubernetes API: a small async REST client over aiohttp.

Objects are plain dicts in the API's own (camelCase) shape, the same dicts the builders return and
kopf's watch events carry, so nothing converts between model classes. Credentials come from the
`kubernetes` package's kubeconfig / in-cluster loaders.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubetune_operator.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

_KUEUE_PLURALS = {
    "Workload": "workloads",
    "ResourceFlavor": "resourceflavors",
    "WorkloadPriorityClass": "workloadpriorityclasses",
}
_CORE_PLURALS = {
    "Pod": "pods",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Secret": "secrets",
    "Event": "events",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def load_configuration(kubeconfig: str | None = None) -> k8s_client.Configuration:
    """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    cfg = k8s_client.Configuration()
    try:
        if kubeconfig:
            raise k8s_config.ConfigException("kubeconfig given explicitly")
        k8s_config.load_incluster_config(client_configuration=cfg)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
    return cfg


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """The REST collection path of a kind (the few kinds the operator touches)."""
    if api_version == "v1":
        plural = _CORE_PLURALS.get(kind) or kind.lower() + "s"
        return f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"
    if kind == "FineTuneJob":
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    if api_version.startswith("kueue.x-k8s.io/"):
        plural = _KUEUE_PLURALS[kind]
        return (
            f"/apis/{api_version}/namespaces/{namespace}/{plural}"
            if namespace
            else f"/apis/{api_version}/{plural}"
        )
    if kind == "Lease":
        return f"/apis/{api_version}/namespaces/{namespace}/leases"
    raise ValueError(f"unsupported kind {api_version}/{kind}")


class Kube:
    """Async client; one instance (and one connection pool) per operator process."""

    def __init__(self, cfg: k8s_client.Configuration, timeout: float = 30.0) -> None:
        self._cfg = cfg
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # API requests made (benchmarks report requests per job)

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._cfg.verify_ssl:
            return False
        ctx = ssl.create_default_context(cafile=self._cfg.ssl_ca_cert)
        if self._cfg.cert_file and self._cfg.key_file:
            ctx.load_cert_chain(self._cfg.cert_file, self._cfg.key_file)
        return ctx

    def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=32)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": "kubetune-operator",
        }
        # kubernetes' loaders keep "Bearer <token>" under "BearerToken" (older releases: "authorization");
        # the in-cluster refresh hook re-reads rotated service-account tokens on each call.
        token = self._cfg.get_api_key_with_prefix("BearerToken") or self._cfg.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        self.requests += 1
        url = self._cfg.host.rstrip("/") + path
        data = json.dumps(body) if body is not None else None
        async with self._session_get().request(
            method, url, data=data, params=params, headers=self._headers(content_type)
        ) as resp:
            text = await resp.text()
            try:
                doc = json.loads(text) if text else {}
            except ValueError:  # e.g. "404 page not found" for an API group nobody serves
                if resp.status < 400:
                    raise
                doc = {}
            if resp.status >= 400:
                raise ApiError(
                    resp.status, str(doc.get("reason", resp.reason)), str(doc.get("message", text))
                )
            return doc

    async def stream(
        self, path: str, params: Mapping[str, str], read_timeout: float = 330.0
    ) -> AsyncIterator[dict[str, Any]]:
        """A watch: one JSON event per line until the server ends the stream (its timeoutSeconds)."""
        self.requests += 1
        url = self._cfg.host.rstrip("/") + path
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=read_timeout)
        async with self._session_get().get(
            url, params=params, headers=self._headers("application/json"), timeout=timeout
        ) as resp:
            if resp.status >= 400:
                text = await resp.text()
                doc = json.loads(text) if text.startswith("{") else {}
                raise ApiError(
                    resp.status, str(doc.get("reason", resp.reason)), str(doc.get("message", text))
                )
            # Not `async for line in resp.content`: aiohttp caps a line at 64 KiB; a pod can be bigger.
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    # -- objects ---------------------------------------------------------------------------------------
    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; False when it already exists (deterministic names make that a success)."""
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        try:
            await self.request("POST", path, obj)
            return True
        except ApiError as err:
            if err.status == 409 and err.reason == "AlreadyExists":
                return False
            raise

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT `obj` over the existing object (unconditionally: no resourceVersion)."""
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        return await self.request("PUT", f"{path}/{meta['name']}", obj)

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"{collection_path(api_version, kind, namespace)}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def delete(
        self, api_version: str, kind: str, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> bool:
        """Delete; False when already gone. Background propagation lets the garbage collector cascade."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", f"{collection_path(api_version, kind, namespace)}/{name}", body)
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    async def patch_job_status(
        self, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str | None
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; with resource_version, a stale write fails with 409."""
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        path = f"{collection_path(f'{GROUP}/{VERSION}', 'FineTuneJob', namespace)}/{name}/status"
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, component: str
    ) -> None:
        """A core/v1 Event on the job, shown by `kubectl describe ftj`. Failures are logged, never raised."""
        meta = involved["metadata"]
        now = _now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved.get("kind", "FineTuneJob"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }
        try:
            await self.request("POST", collection_path("v1", "Event", meta["namespace"]), event)
        except (TimeoutError, ApiError, aiohttp.ClientError) as err:
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err)


def _now_rfc3339() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
