"""Static checks of the operator image's Dockerfile (no Docker engine here; a later issue builds it with
buildah): multi-stage, only `.[operator]` installed, no pip cache, non-root, the right entry point, a
tight build context; and that the operator really runs without the trainer's heavy dependencies."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from kubeutil import REPO

pytestmark = pytest.mark.unit

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, rest in instructions():
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, rest))
    return result


def test_base_image_is_a_slim_python_311_arg() -> None:
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in instructions()
    froms = [rest for op, rest in instructions() if op == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]


def test_builder_installs_only_the_operator_extra_without_cache() -> None:
    builder = stages()[0]
    runs = " ".join(rest for op, rest in builder if op == "RUN")
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert installs, runs
    for args in installs:
        assert "--no-cache-dir" in args, args
    targets = [a for args in installs for a in shlex.split(args) if not a.startswith("-")]
    assert targets == ["build", "${WHEEL}[operator]"], targets
    assert "[trainer]" not in runs and "[dev]" not in runs and "torch" not in runs
    env = " ".join(rest for op, rest in builder if op == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env


def test_final_stage_copies_only_the_venv_and_runs_as_non_root() -> None:
    final = stages()[-1]
    copies = [rest for op, rest in final if op == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert "pip install" not in runs and "apt-get" not in runs  # no compilers or package caches
    users = [rest for op, rest in final if op == "USER"]
    assert len(users) == 1
    uid = users[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    chart_uid = 65532  # values.yaml podSecurityContext.runAsUser
    assert int(uid) == chart_uid
    entry = [rest for op, rest in final if op == "ENTRYPOINT"]
    assert entry == ['["kubetune-operator"]']
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubetune-operator"] == "kubetune_operator.cli:main"
    env = " ".join(rest for op, rest in final if op == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env  # `python` in the helm test pod is the venv's


def test_operator_extra_has_no_training_dependencies() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in extras["operator"]}
    assert not names & {"torch", "torchvision", "timm", "wandb", "numpy"}


def test_operator_imports_without_trainer_dependencies() -> None:
    """The image has only `.[operator]`: the operator's modules must import with torch & co absent."""
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'timm', 'wandb', 'numpy', 'safetensors', 'PIL', 'sklearn'):\n"
        "    sys.modules[m] = None\n"
        "import kubetune_operator.cli, kubetune_operator.handlers, kubetune_operator.controller\n"
        "kubetune_operator.cli.parser().parse_args(['--all-namespaces'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_build_context_is_minimal() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()]
    rules = [ln for ln in lines if not ln.startswith("#")]
    assert rules[0] == "**", "ignore everything, then allow what the Dockerfile copies"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator", "trainer_image/kubetune_trainer"}
    copied = {
        src.rstrip("/").rstrip("*") for op, rest in stages()[0] if op == "COPY" for src in rest.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
