"""Incremental views in ``matview status`` (table and ``--json``), ``freshness()`` and the
metrics: their dirty buckets, and a staleness bounded by their last refresh."""

from __future__ import annotations

import datetime as dt
import importlib
import json
from collections.abc import Callable

import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from sqlalchemy_matview import freshness, refresh_views
from sqlalchemy_matview.cli import main
from sqlalchemy_matview.metrics import RefreshMetrics
from sqlalchemy_matview.orchestration.dirty import dirty_buckets

MODELS = """
import datetime as dt
import sqlalchemy as sa
from sqlalchemy_matview import Incremental, MaterializedView

metadata = sa.MetaData()
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
)
day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
mv_daily = MaterializedView(
    "mv_daily", metadata,
    sa.select(day.label("day"), sa.func.count().label("n")).group_by(day),
    incremental=Incremental(key="day", sources={events: day}),
    max_staleness=dt.timedelta(hours=1),
)
mv_users = MaterializedView(
    "mv_users", metadata,
    sa.select(events.c.user_id, day.label("day"), sa.func.count().label("n"))
    .group_by(events.c.user_id, day),
    incremental=Incremental(
        key=("user_id", "day"), sources={events: (events.c.user_id, day)}
    ),
)
"""

NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)


def _status(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["status", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _write(engine: sa.Engine, events: sa.Table, days: int, users: int = 1) -> None:
    rows = [
        {"created_at": NOW - dt.timedelta(days=d), "user_id": u}
        for d in range(days)
        for u in range(users)
    ]
    with engine.begin() as conn:
        conn.execute(events.insert(), rows)


def test_status_freshness_and_metrics_show_dirty_buckets(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    name = models_module(MODELS)
    models = importlib.import_module(name)
    models.metadata.create_all(engine)
    _write(engine, models.events, days=3)
    refresh_views(engine, models.mv_daily, models.mv_users)

    # Fresh: listed as incremental, nothing dirty, staleness zero.
    code, out = _status("--url", url_text, "--metadata", f"{name}:metadata", "--json")
    assert code == 0, out
    rows = {row["view"]: row for row in json.loads(out)}
    daily = rows["public.mv_daily"]
    assert daily["incremental"] is True and daily["exists"] is True
    assert daily["declared"] == "managed" and daily["populated"] is True
    assert daily["depends_on"] == ["public.events"]
    assert (daily["stale"], daily["dirty_buckets"], daily["truncated"]) == (False, 0, False)
    assert daily["last_refreshed_at"] is not None
    assert daily["max_staleness"] == 3600 and daily["breached"] is False
    [f_daily, f_users] = freshness(engine, models.metadata)
    assert (f_daily.dirty_buckets, f_daily.staleness) == (0, dt.timedelta(0))
    assert f_daily.tracked and f_daily.populated and not f_daily.breached

    # Five days written, many transactions on one of them: five dirty buckets, not rows.
    _write(engine, models.events, days=5, users=2)
    for _ in range(20):
        _write(engine, models.events, days=1)
    code, out = _status("--url", url_text, "--json")
    rows = {row["view"]: row for row in json.loads(out)}
    assert rows["public.mv_daily"]["stale"] is True
    assert rows["public.mv_daily"]["dirty_buckets"] == 5
    assert rows["public.mv_users"]["dirty_buckets"] == 10  # (user, day) pairs
    assert rows["public.mv_daily"]["declared"] is None  # no --metadata
    code, out = _status("--url", url_text)
    assert "5 dirty buckets" in out and "incremental" in out

    [f_daily, f_users] = freshness(engine, models.metadata)
    assert (f_daily.dirty_buckets, f_users.dirty_buckets) == (5, 10)
    assert f_daily.staleness is not None and f_daily.staleness > dt.timedelta(0)
    assert f_daily.staleness < dt.timedelta(minutes=5)

    registry = CollectorRegistry()
    RefreshMetrics(engine, models.metadata, registry=registry)
    text = generate_latest(registry).decode()
    assert 'matview_dirty_buckets{view="public.mv_daily"} 5.0' in text
    assert 'matview_dirty_buckets{view="public.mv_users"} 10.0' in text
    assert 'matview_staleness_seconds{view="public.mv_daily"}' in text

    with engine.connect() as conn:
        capped = dirty_buckets(conn, [("public", "mv_users")], cap=4)
    assert (capped[("public", "mv_users")].count, capped[("public", "mv_users")].capped) == (
        4,
        True,
    )

    # A TRUNCATE: everything will be recomputed; the refresh clears it all.
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE events"))
    code, out = _status("--url", url_text, "--json")
    rows = {row["view"]: row for row in json.loads(out)}
    assert rows["public.mv_daily"]["truncated"] is True
    code, out = _status("--url", url_text)
    assert "full recompute next" in out
    refresh_views(engine, models.mv_daily, models.mv_users)
    code, out = _status("--url", url_text, "--json")
    rows = {row["view"]: row for row in json.loads(out)}
    assert [(r["stale"], r["dirty_buckets"]) for r in rows.values()] == [(False, 0), (False, 0)]
    text = generate_latest(registry).decode()
    assert 'matview_dirty_buckets{view="public.mv_daily"} 0.0' in text


def test_missing_incremental_view_is_listed_as_missing(
    engine: sa.Engine, url_text: str, models_module: Callable[..., str]
) -> None:
    name = models_module(MODELS)
    models = importlib.import_module(name)
    models.events.create(engine)
    code, out = _status("--url", url_text, "--metadata", f"{name}:metadata", "--json")
    assert code == 0, out
    rows = {row["view"]: row for row in json.loads(out)}
    assert rows["public.mv_daily"]["exists"] is False
    [f_daily, _] = freshness(engine, models.metadata)
    assert f_daily.populated is False and f_daily.dirty_buckets is None
