"""How one trainer field is declared: `spec_field(default, doc, resume, bounds...)` and its `FieldSpec`.

Each field of the trainer's spec sections (config.py) is declared once, with this. Everything else is
derived from that one declaration: the trainer's value checks, the CRD's trainer sections
(hack/crd/gen_crd.py), docs/trainer.md's field table and which fields a resume may change. Pure Python:
no torch, no timm, no yaml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RUN = "run"
"""Defines the run (the weights it produces): may not change between a checkpoint and its resume."""
EXTEND = "extend"
"""Extends the run (epochs, maxSteps): may change on resume; the change is applied and logged."""
OBSERVE = "observe"
"""Only observes or paces the run (cadence, telemetry, workers): may change at any resume."""
RESUME_KINDS = (RUN, EXTEND, OBSERVE)


@dataclass(frozen=True)
class FieldSpec:
    """One trainer field's contract. Bounds are inclusive (ge/le) or exclusive (gt/lt)."""

    doc: str
    resume: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    why: str = ""
    """Why the bound exists, shown in the error (e.g. keepLast's fallback)."""
    crd: Mapping[str, Any] = field(default_factory=dict)
    """Schema keywords only the CRD needs: maxLength, pattern, format, maxItems, itemMaxLength."""
    nested: type | None = None
    """For an object field (data.augment, training.mixup, ...): the frozen dataclass of its sub-fields,
    each declared with spec_field too. Absent (None) means the feature is off."""
    items: int | None = None
    """For a list-of-numbers field (data.augment.scale): the exact number of items."""

    def bounds_text(self) -> str:
        """`> 0 and <= 10`, `>= 0`, or "" without bounds."""
        return " and ".join(self._bounds(low=True) + self._bounds(low=False))

    def _bounds(self, low: bool) -> list[str]:
        pairs = ((">=", self.ge), (">", self.gt)) if low else (("<=", self.le), ("<", self.lt))
        return [f"{op} {_num(v)}" for op, v in pairs if v is not None]

    def check(self, path: str, value: Any) -> str | None:
        """The problem with `value` (already of the right type), as `path: must be ...`, or None.

        Only the violated side of a range is named: `must be > 0, got -1`, `must be <= 10, got 11`."""
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"{path}: must be one of {', '.join(self.choices)}, got {value!r}"
        if isinstance(value, tuple) and value and all(isinstance(v, int | float) for v in value):
            if self.items is not None and len(value) != self.items:
                return f"{path}: must have {self.items} numbers, got {len(value)}"
            for i, v in enumerate(value):  # each item within the bounds
                problem = self.check(f"{path}[{i}]", v)
                if problem:
                    return problem
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt):
            bound = self._bounds(low=True)
        elif (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt):
            bound = self._bounds(low=False)
        else:
            return None
        why = f" ({self.why})" if self.why else ""
        return f"{path}: must be {' and '.join(bound)}{why}, got {_num(value)}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else str(value)


def spec_field(
    default: Any,
    doc: str,
    resume: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] = (),
    required: bool = False,
    why: str = "",
    nested: type | None = None,
    items: int | None = None,
    **crd: Any,
) -> Any:
    """A dataclass field carrying its FieldSpec (under metadata["kubetune"])."""
    assert resume in RESUME_KINDS, resume
    spec = FieldSpec(doc, resume, ge, gt, le, lt, choices, required, why, crd, nested, items)
    return field(default=default, metadata={"kubetune": spec})


def field_spec(f: dataclasses.Field[Any]) -> FieldSpec:
    spec: FieldSpec = f.metadata["kubetune"]
    return spec


def plain(value: Any) -> Any:
    """A field value as plain data: tuples as lists, nested config dataclasses as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def walk(cls: type, prefix: str) -> list[tuple[str, dataclasses.Field[Any], FieldSpec]]:
    """(dotted path, field, spec) of every field of `cls`, nested object fields followed by their own."""
    out = []
    for f in dataclasses.fields(cls):
        fs = field_spec(f)
        out.append((f"{prefix}.{f.name}", f, fs))
        if fs.nested is not None:
            out.extend(walk(fs.nested, f"{prefix}.{f.name}"))
    return out


def default_of(f: dataclasses.Field[Any]) -> Any:
    """The field's default as plain data (tuples as lists), None for a required field."""
    if field_spec(f).required or f.default is dataclasses.MISSING:
        return None
    return list(f.default) if isinstance(f.default, tuple) else f.default
