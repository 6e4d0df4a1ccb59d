#!/usr/bin/env bash
# PLACEHOLDER: `make demo` is not built yet (issue: a real node + the end-to-end scenario).
# It fails on purpose rather than pretending to show something.
echo "make demo: not built yet - the end-to-end demo (real kubelet node, helm install, real preemption and resume) is a later issue." >&2
exit 1
