"""Races made deterministic: each interleaving is forced with an advisory lock the test holds.

A refresh (or a second refresher) is paused on a lock held by the test, the test waits
until PostgreSQL shows that backend waiting for it (``pg_locks``), does what must happen
"meanwhile", then lets go. Nothing depends on a sleep landing inside another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, lock_key, refresh_stale
from sqlalchemy_matview.orchestration import view_states

from .conftest import rows

#: Key of the gate lock a view definition takes (see ``gated_view``).
GATE = 7_137_001


def advisory_waiters(engine: sa.Engine, key: int) -> int:
    """How many backends wait (ungranted) for the bigint advisory lock ``key``."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND objsubid = 1 AND NOT granted AND classid = :hi AND objid = :lo"
                    " AND database = (SELECT oid FROM pg_database"
                    "                 WHERE datname = current_database())"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            )
        )


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.02)


class Background:
    """Run ``fn`` in a thread; ``result()`` re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # handed to the test thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call did not finish"
        if self._error is not None:
            raise self._error
        return self._value


def _state(engine: sa.Engine, name: str) -> Any:
    with engine.connect() as conn:
        return view_states(conn)[("public", name)]


def test_change_committed_during_refresh_is_not_lost(engine):
    """A write committed after the refresh's snapshot keeps the view stale."""
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    # Reading the view takes a shared advisory lock: while the test holds it exclusively,
    # a REFRESH (its snapshot already taken) waits there.
    gated = MaterializedView(
        "mv_gated",
        md,
        sa.text(f"SELECT id FROM src CROSS JOIN LATERAL pg_advisory_xact_lock_shared({GATE}) g"),
        columns=[sa.Column("id", sa.Integer)],
        unique_key="id",
        track_changes=True,
        depends_on=[src],
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}])
    assert _state(engine, "mv_gated").stale

    with engine.connect() as gate:
        gate.execute(sa.select(sa.func.pg_advisory_lock(GATE)))
        refresher = Background(lambda: refresh_stale(engine, md))
        wait_until(lambda: advisory_waiters(engine, GATE) == 1, "the REFRESH waits at the gate")
        with engine.begin() as conn:  # committed while the refresh is running
            conn.execute(src.insert(), [{"id": 2}])
        gate.execute(sa.select(sa.func.pg_advisory_unlock(GATE)))
        gate.commit()
        [first] = refresher.result()

    assert first.status == "refreshed"
    assert rows(engine, gated) == [(1,)]  # the refresh could not see id=2 ...
    state = _state(engine, "mv_gated")
    assert state.stale and state.pending_changes == 1  # ... so its change is still pending
    [second] = refresh_stale(engine, md)
    assert second.status == "refreshed"
    assert rows(engine, gated) == [(1,), (2,)]
    assert not _state(engine, "mv_gated").stale


def test_change_committed_before_refresh_is_covered(engine):
    """The converse: a write committed before the refresh starts is cleared by it."""
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    view = MaterializedView(
        "mv_plain", md, sa.select(src.c.id), unique_key="id", track_changes=True
    )
    md.create_all(engine)
    for i in (1, 2, 3):  # three transactions: the first marks, the others find the mark
        with engine.begin() as conn:
            conn.execute(src.insert(), [{"id": i}])
    assert _state(engine, "mv_plain").pending_changes == 1
    [result] = refresh_stale(engine, md)
    assert result.status == "refreshed"
    assert rows(engine, view) == [(1,), (2,), (3,)]
    state = _state(engine, "mv_plain")
    assert not state.stale and state.pending_changes == 0
    assert state.refresh_count == 1


def test_two_refresh_stale_calls_refresh_one_change_once(engine):
    """Both callers saw the view stale; the second re-checks under the lock and skips it."""
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer, primary_key=True))
    view = MaterializedView("mv_once", md, sa.select(src.c.id), unique_key="id", track_changes=True)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}])
    key = lock_key(view)

    with engine.connect() as holder:
        # Holding the view's own refresh lock: both callers plan (and see the view stale),
        # then queue behind the holder. Whichever gets the lock first refreshes; the other
        # gets it after that commit and must find, under the lock, nothing left to do.
        holder.execute(sa.select(sa.func.pg_advisory_lock(key)))
        first = Background(lambda: refresh_stale(engine, md, lock="wait"))
        second = Background(lambda: refresh_stale(engine, md, lock="wait"))
        wait_until(lambda: advisory_waiters(engine, key) == 2, "both callers wait for the lock")
        holder.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        holder.commit()
        statuses = sorted(r.status for call in (first, second) for r in call.result())

    assert statuses == ["refreshed", "skipped_fresh"]
    assert rows(engine, view) == [(1,)]
    state = _state(engine, "mv_once")
    assert not state.stale and state.refresh_count == 1
