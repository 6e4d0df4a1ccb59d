"""Reading a FineTuneJob: a manifest or bare spec from YAML, `--set` overrides, $KUBETUNE_DATA_PATH, and
the raw values checked against each field's type before config.validate() checks their bounds.

No torch, no timm: the operator and the CRD generator import the config package cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.config import (
    KIND,
    OPERATOR_ONLY_FIELDS,
    OPERATOR_ONLY_TOP,
    SECTIONS,
    ConfigError,
    JobConfig,
)
from kubetune_trainer.fields import field_spec


def _unknown(path: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower()]
    hint = f"; did you mean {close[0]}?" if close else f"; known fields: {', '.join(sorted(known))}"
    return ConfigError(f"{path}.{key}: unknown field{hint}")


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number(path: str, value: Any) -> float:
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # 1e-3: a string to YAML 1.1 (PyYAML), a number to kubectl and JSON
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: must be a number, got {value!r}")
    return float(value)


def _coerce(path: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Check a raw YAML value against the field's annotation (strings, from the class body)."""
    ann = str(f.type)
    if value is None:
        if "None" in ann:
            return None
        raise ConfigError(f"{path}: must not be null")
    nested = field_spec(f).nested
    if nested is not None:
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{path}: must be a mapping of {', '.join(_field_names(nested))}, got {value!r}"
            )
        return _build(path, nested, value)
    if ann.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if ann.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if ann.startswith("float"):
        return _number(path, value)
    if ann.startswith("tuple[float"):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: must be a list of numbers, e.g. [0.6, 1.0], got {value!r}")
        return tuple(_number(f"{path}[{i}]", v) for i, v in enumerate(value))
    if ann.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: must be a list of strings, got {value!r}")
        return tuple(value)
    if ann.startswith("str | tuple"):
        if isinstance(value, str):
            return value
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{path}: must be a string or a non-empty list of strings, got {value!r}")
    if ann.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    return value


def parse_spec(spec: Mapping[str, Any], name: str = "local") -> JobConfig:
    """Turn a raw `spec` mapping into a validated JobConfig (ConfigError on anything wrong)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"spec: must be a mapping, got {type(spec).__name__}")
    for key in spec:
        if key not in SECTIONS and key not in OPERATOR_ONLY_TOP:
            raise _unknown("spec", key, [*SECTIONS, *OPERATOR_ONLY_TOP])
    if "model" not in spec:
        raise ConfigError("spec.model.name: required (a timm model name, e.g. resnet50)")
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        raw = spec.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"spec.{section}: must be a mapping, got {raw!r}")
        sections[section] = _build(section, cls, raw, OPERATOR_ONLY_FIELDS.get(section, frozenset()))
    return JobConfig(name=name, **sections).validate()


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(path: str, cls: type, raw: Mapping[str, Any], ignored: frozenset[str] = frozenset()) -> Any:
    """An instance of a section's (or nested object's) dataclass from its raw mapping; unknown keys fail."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ignored:
            continue
        if key not in fields:
            raise _unknown(f"spec.{path}", key, [*fields, *ignored])
        kwargs[key] = _coerce(f"{path}.{key}", fields[key], value)
    return cls(**kwargs)


def set_path(doc: dict[str, Any], assignment: str) -> None:
    """Apply one `--set training.epochs=3` to a raw spec dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected FIELD=VALUE, e.g. training.epochs=3")
    key, _, raw = assignment.partition("=")
    parts = key.strip().removeprefix("spec.").split(".")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else None


def load_job(
    path: str | Path | None, overrides: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> JobConfig:
    """Read a FineTuneJob manifest or a bare spec, apply --set overrides and $KUBETUNE_DATA_PATH, validate."""
    env = os.environ if env is None else env
    doc: Any = {}
    if path is not None:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"-f {path}: cannot read: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"-f {path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"-f {path}: expected a FineTuneJob manifest or a spec mapping")
    name = "local"
    if "spec" in doc or "kind" in doc:
        if doc.get("kind", KIND) != KIND:
            raise ConfigError(f"kind: expected {KIND}, got {doc.get('kind')!r}")
        name = str((doc.get("metadata") or {}).get("name") or name)
        spec = doc.get("spec") or {}
    else:
        spec = doc
    spec = _deepcopy(spec)
    for assignment in overrides:
        set_path(spec, assignment)
    if env.get("KUBETUNE_DATA_PATH"):
        spec.setdefault("data", {})
        if isinstance(spec["data"], dict):
            spec["data"]["path"] = env["KUBETUNE_DATA_PATH"]
    return parse_spec(spec, name=env.get("KUBETUNE_JOB") or name)


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj
