"""The informer's re-list difference: what a list means against the store (pure)."""

from __future__ import annotations

import pytest

from kubetune_operator.informer import diff_list

pytestmark = pytest.mark.unit


def obj(name: str, rv: str, ns: str = "ml") -> dict:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}}


def test_a_relist_reports_what_vanished_changed_and_appeared():
    store = {"ml/a": obj("a", "1"), "ml/b": obj("b", "2"), "other/a": obj("a", "3", "other")}
    events = diff_list(store, [obj("a", "1"), obj("b", "5"), obj("c", "6")])
    assert [(t, o["metadata"]["namespace"], o["metadata"]["name"]) for t, o in events] == [
        ("MODIFIED", "ml", "b"),
        ("ADDED", "ml", "c"),
        ("DELETED", "other", "a"),
    ]
    # The DELETED carries the last state seen, so the pod's last conditions are still known.
    assert events[-1][1]["metadata"]["resourceVersion"] == "3"


def test_an_unchanged_relist_reports_nothing():
    store = {"ml/a": obj("a", "1")}
    assert diff_list(store, [obj("a", "1")]) == []
    assert diff_list({}, []) == []
