"""The scheduling both refresh workers share: debounce, max_delay, interval, retry, backoff."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import RefreshResult, WorkerOptionError
from sqlalchemy_matview.orchestration.schedule import (
    LockedViews,
    RefreshSchedule,
    Whitelist,
    backoff_delay,
    lost_connection,
    needs_retry,
)
from sqlalchemy_matview.orchestration.worker_options import worker_options

from .conftest import build_shop


def test_debounce_waits_for_quiet():
    s = RefreshSchedule(1.0, 10.0, None, now=0.0)
    assert s.deadline() is None and s.take(100.0) is None
    s.changed(0.0)
    s.changed(0.5)
    assert s.pending and s.deadline() == 1.5
    assert s.take(1.4) is None
    assert s.take(1.5) == "change"
    assert not s.pending and s.deadline() is None


def test_max_delay_bounds_a_stream():
    s = RefreshSchedule(1.0, 3.0, None, now=0.0)
    t = 0.0
    while s.take(t) is None:
        s.changed(t)
        t += 0.5
    assert t == 3.0  # first change at 0, never a second of quiet


def test_interval_restarts_after_every_pass():
    s = RefreshSchedule(1.0, 10.0, 5.0, now=0.0)
    assert s.deadline() == 5.0
    s.changed(2.0)
    assert s.take(3.0) == "change"
    assert s.deadline() == 8.0  # the change pass counts as the periodic one
    assert s.take(8.0) == "interval"


def test_unfinished_passes_are_retried_with_doubling_delay():
    s = RefreshSchedule(0.5, 5.0, None, now=0.0)
    s.finished(True, 0.0)
    assert s.deadline() == 1.0  # max(debounce, 1)
    assert s.take(1.0) == "retry"
    s.finished(True, 1.0)
    assert s.deadline() == 3.0
    s.finished(True, 3.0)
    assert s.deadline() == 7.0
    s.finished(True, 7.0)
    assert s.deadline() == 12.0  # capped at max_delay
    s.finished(False, 12.0)
    assert s.deadline() is None


def test_backoff_and_timings():
    assert [backoff_delay(a, 4.0) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_delay(10_000, 30.0) == 30.0
    md = build_shop().metadata
    options = worker_options(md, owner="W", debounce=5, max_delay=2)
    assert (options.debounce, options.max_delay, options.interval) == (5.0, 5.0, None)
    for name, bad in [("debounce", -1), ("max_delay", -1), ("interval", 0)]:
        with pytest.raises(WorkerOptionError, match=rf"W\({name}="):
            worker_options(md, owner="W", **{name: bad})


def test_whitelist_bounds_its_log_lines_and_keeps_no_payload(caplog):
    caplog.set_level(logging.WARNING, logger="sqlalchemy_matview")
    shop = build_shop()
    wl = Whitelist(shop.metadata, "chan")
    wl.load(current_schema="app")
    assert wl.names == {"app.mv_totals", "app.mv_top"}
    assert wl.accept("app.mv_top", now=0.0)
    for i in range(1000):
        assert not wl.accept(f"forged {i} " + "x" * 500, now=i / 100)
    assert wl.ignored == 1000
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "forged 0 " in lines[0] and "(500" not in lines[0]
    assert all(len(line) < 300 for line in lines), "a payload was logged whole"
    assert "more are only counted" in lines[2]
    # Within the next minute: at most three more lines, the first with the count.
    caplog.clear()
    for i in range(1000):
        wl.accept(f"again {i}", now=60.0 + i / 100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "ignored 997 more notification(s)" in lines[0] and "(1000 since start)" in lines[0]
    # A flood that stopped is still counted, by the workers' periodic flush.
    caplog.clear()
    wl.flush(200.0)
    [line] = [r.getMessage() for r in caplog.records]
    assert "ignored 998 more" in line
    wl.flush(300.0)
    wl.flush(400.0)
    assert len(caplog.records) == 1


def test_locked_views_are_warned_after_max_delay_then_at_most_once_a_minute():
    locked = LockedViews(max_delay=10.0)

    def results(*statuses: str) -> list[RefreshResult]:
        return [RefreshResult(f"public.v{i}", s) for i, s in enumerate(statuses)]  # type: ignore[arg-type]

    assert locked.update(results("skipped_locked", "refreshed"), 0.0) == []
    assert locked.update(results("skipped_locked", "skipped_locked"), 9.0) == []
    assert locked.update(results("skipped_locked", "skipped_locked"), 10.0) == [("public.v0", 10.0)]
    assert locked.update(results("skipped_locked", "skipped_locked"), 19.0) == [("public.v1", 10.0)]
    assert locked.update(results("skipped_locked", "skipped_locked"), 69.0) == []
    assert locked.update(results("skipped_locked", "refreshed"), 70.0) == [("public.v0", 70.0)]
    # Refreshed (or found fresh) once: the clock starts again.
    assert locked.update(results("refreshed", "skipped_locked"), 71.0) == []
    assert locked.update(results("skipped_locked"), 72.0) == []


def test_results_needing_retry_or_reconnect():
    ok = RefreshResult("public.a", "refreshed", True, 0.1, None)
    locked = RefreshResult("public.a", "skipped_locked", False, 0.0, None)
    gone = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
    gone.connection_invalidated = True
    lost = RefreshResult("public.b", "failed", False, 0.0, gone)
    assert not needs_retry([ok]) and needs_retry([ok, locked]) and needs_retry([lost])
    assert lost_connection([ok, locked]) is None
    assert lost_connection([ok, lost]) is gone


def test_result_properties():
    def result(status: str) -> RefreshResult:
        return RefreshResult("public.a", status)  # type: ignore[arg-type]

    assert result("refreshed").ok and not result("refreshed").skipped
    assert result("skipped_fresh").ok and result("skipped_fresh").skipped
    assert result("skipped_locked").ok and result("skipped_locked").skipped
    assert not result("failed").ok and not result("failed").skipped
    dependency = result("skipped_dependency_failed")
    assert not dependency.ok and dependency.skipped
