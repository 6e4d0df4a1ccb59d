# syntax=docker/dockerfile:1
# The kubetune operator image: `kubetune-operator` (kopf) in a venv on slim Python, running as non-root.
#
#   docker build -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#
# Two stages: the builder makes a wheel of this repository and installs it with the `operator` extra
# (kopf, kubernetes, prometheus-client; never torch) into /opt/venv; the final stage copies only that
# venv. No compiler, pip cache or source tree reaches the final image. tests/chart/test_dockerfile.py
# checks these invariants statically.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel needs (see .dockerignore): packaging metadata and the two packages.
COPY pyproject.toml README.md* ./
COPY operator/ operator/
COPY trainer_image/kubetune_trainer/ trainer_image/kubetune_trainer/
RUN /opt/venv/bin/pip install --no-cache-dir build \
 && /opt/venv/bin/python -m build --wheel --outdir /wheels . \
 && /opt/venv/bin/pip uninstall -y build pyproject_hooks packaging \
 && WHEEL=$(ls /wheels/kubetune-*.whl) \
 && /opt/venv/bin/pip install --no-cache-dir "${WHEEL}[operator]" \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="FineTuneJob operator: preemption-safe timm fine-tuning" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip is not needed at run time either.
RUN python -m pip uninstall -y pip setuptools wheel 2>/dev/null || true \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kubetune-operator"]
