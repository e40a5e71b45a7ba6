"""Shared state: put, get, compare-and-set, delete and a watch."""

from __future__ import annotations

import maos
from conftest import STEP_S


def test_put_get_cas(client: maos.Client) -> None:
    key = f"py-sdk/{maos._core.idempotency_key()}"
    assert client.kv.get(key) is None
    created = client.kv.cas(key, None, "one")
    assert created.succeeded and created.revision > 0
    clash = client.kv.cas(key, None, "again")
    assert (clash.succeeded, clash.current) == (False, "one")
    stale = client.kv.cas(key, "zero", "two")
    assert (stale.succeeded, stale.current) == (False, "one")
    moved = client.kv.cas(key, "one", "two")
    assert moved.succeeded and moved.revision > created.revision
    revision = client.kv.put(key, "three")
    found = client.kv.get(key)
    assert found is not None and (found.value, found.revision) == ("three", revision)
    assert client.kv.get(key, stale=True) is not None
    assert client.kv.delete(key) and client.kv.get(key) is None


def test_watch_sees_the_keys_then_their_changes(client: maos.Client) -> None:
    prefix = f"py-watch/{maos._core.idempotency_key()}/"
    client.kv.put(prefix + "a", "1")
    events = client.kv.watch(prefix, timeout=STEP_S)
    first = next(events)
    assert (first.key, first.value, first.initial) == (prefix + "a", "1", True)
    client.kv.put(prefix + "b", "2")
    change = next(e for e in events if not e.initial)
    assert (change.key, change.value, change.initial) == (prefix + "b", "2", False)
    events.close()
