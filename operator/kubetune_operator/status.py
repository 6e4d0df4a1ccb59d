"""FineTuneJob status: conditions, timestamps, and the diff that decides whether a write is needed."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PHASES = ("Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
# One condition per phase a user may want to wait on (`kubectl wait --for=condition=Succeeded`).
CONDITION_TYPES = ("Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
FINISHED = ("Succeeded", "Failed")


def fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def set_phase(
    status: dict[str, Any], phase: str, reason: str, message: str, now: datetime, generation: int
) -> None:
    """Set phase, message and the matching condition True (others False), keeping transition times stable.
    Conditions of other types (TensorBoardReady) are kept as they are."""
    assert phase in PHASES, phase
    status["phase"] = phase
    status["message"] = message
    old = {c.get("type"): c for c in status.get("conditions") or []}
    others = [c for c in status.get("conditions") or [] if c.get("type") not in CONDITION_TYPES]
    conditions = []
    for ctype in CONDITION_TYPES:
        value = "True" if ctype == phase else "False"
        prev = old.get(ctype)
        if prev is None and value == "False":
            continue
        cond = {
            "type": ctype,
            "status": value,
            "reason": reason if value == "True" else (prev or {}).get("reason", reason),
            "message": message if value == "True" else (prev or {}).get("message", ""),
            "lastTransitionTime": fmt_time(now),
            "observedGeneration": generation,
        }
        if prev is not None and prev.get("status") == value:
            cond["lastTransitionTime"] = prev.get("lastTransitionTime", cond["lastTransitionTime"])
            if value == "False":
                cond["reason"], cond["message"] = prev.get("reason", ""), prev.get("message", "")
        conditions.append(cond)
    status["conditions"] = conditions + others


def get_condition(status: Mapping[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def set_condition(
    status: dict[str, Any], ctype: str, value: bool, reason: str, message: str, now: datetime, generation: int
) -> None:
    """Set one condition that is not a phase. Its lastTransitionTime moves when its status or its reason
    changes (a retry timer counts from when a reason was entered)."""
    prev = get_condition(status, ctype)
    cond = {
        "type": ctype,
        "status": "True" if value else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": fmt_time(now),
        "observedGeneration": generation,
    }
    if prev is not None and (prev.get("status"), prev.get("reason")) == (cond["status"], reason):
        cond["lastTransitionTime"] = prev.get("lastTransitionTime", cond["lastTransitionTime"])
    conditions = [cond if c.get("type") == ctype else c for c in status.get("conditions") or []]
    status["conditions"] = conditions if prev is not None else [*conditions, cond]


def drop_condition(status: dict[str, Any], ctype: str) -> None:
    if get_condition(status, ctype) is not None:
        status["conditions"] = [c for c in status["conditions"] if c.get("type") != ctype]


def set_best(status: dict[str, Any], value: float | None, step: int | None, name: str | None = None) -> None:
    """status.bestMetric/bestStep(/bestMetricName): the model in best/ (checkpoint.best), as reported."""
    if value is None or step is None:
        return
    status["bestMetric"] = round(float(value), 5)
    status["bestStep"] = int(step)
    if name:
        status["bestMetricName"] = name


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch turning `old` into `new`, or None when nothing changed (no write needed)."""
    if dict(old) == dict(new):
        return None
    patch: dict[str, Any] = _merge_diff(old, new)
    return patch


def _merge_diff(old: Any, new: Any) -> Any:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: dict[str, Any] = {}
        for key in set(old) | set(new):
            if key not in new:
                out[key] = None
            elif old.get(key) != new[key]:
                out[key] = _merge_diff(old.get(key), new[key])
        return out
    return copy.deepcopy(new)


def format_eta(seconds: float | None) -> str | None:
    """12m3s style, as kubectl prints ages."""
    if seconds is None or seconds < 0:
        return None
    s = round(seconds)
    hours, rem = divmod(s, 3600)
    minutes, secs = divmod(rem, 60)
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True)
class JobStatus:
    """What the controller reads of `FineTuneJob.status`, parsed once at the edge (the lifecycle owns
    every write; these names are the status fields' contract)."""

    phase: str = "Pending"
    attempt: int = 0  # 0: no attempt planned yet
    next_attempt_time: datetime | None = None  # set: the attempt's pods are not created yet

    @classmethod
    def parse(cls, status: Mapping[str, Any] | None) -> JobStatus:
        st = status or {}
        try:
            attempt = int(st.get("attempt") or 0)
        except (TypeError, ValueError):
            attempt = 0
        return cls(
            phase=str(st.get("phase") or "Pending"),
            attempt=attempt,
            next_attempt_time=parse_time(st.get("nextAttemptTime")),
        )

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def pods_created(self) -> bool:
        """The current attempt's pods were created (or are being): the status write before the create
        cleared nextAttemptTime."""
        return self.attempt > 0 and self.next_attempt_time is None
