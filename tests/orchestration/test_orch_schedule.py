"""The scheduling both refresh workers share: debounce, max_delay, interval, retry, backoff."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import RefreshResult
from sqlalchemy_matview.orchestration.schedule import (
    RefreshSchedule,
    Whitelist,
    backoff_delay,
    check_timings,
    lost_connection,
    needs_retry,
)

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
    assert check_timings(5, 2, None) == (5.0, 5.0, None)
    for bad in [(-1, 1, None), (1, -1, None), (1, 1, 0)]:
        with pytest.raises(ValueError, match="debounce"):
            check_timings(*bad)


def test_whitelist_logs_each_unknown_payload_once(caplog):
    caplog.set_level(logging.WARNING, logger="sqlalchemy_matview")
    shop = build_shop()
    wl = Whitelist(shop.metadata, "chan")
    wl.load(current_schema="app")
    assert wl.names == {"app.mv_totals", "app.mv_top"}
    assert wl.accept("app.mv_top")
    assert not wl.accept("public.mv_top")
    assert not wl.accept("public.mv_top")
    assert len([r for r in caplog.records if "public.mv_top" in r.getMessage()]) == 1


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
