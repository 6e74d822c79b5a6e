"""Incremental declarations: what is accepted, and every refusal naming the view and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from sqlalchemy_matview import (
    DefinitionError,
    Incremental,
    IncrementalRefreshError,
    MaterializedView,
    refresh,
)

from .conftest import build_dashboard


def events_table(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("local_at", sa.DateTime(), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
    )


def declare(
    definition: Any = None,
    key: Any = "day",
    sources: Any = None,
    md: sa.MetaData | None = None,
    **kw: Any,
) -> MaterializedView:
    md = md or sa.MetaData()
    events = md.tables["events"] if "events" in md.tables else events_table(md)
    day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
    if definition is None:
        definition = sa.select(day.label("day"), sa.func.count().label("n")).group_by(day)
    elif callable(definition):
        definition = definition(events, day)
    if sources is None:
        sources = {events: day}
    elif callable(sources):
        sources = sources(events, day)
    options = {k: kw.pop(k) for k in ("full_refresh_above",) if k in kw}
    return MaterializedView(
        "mv_daily",
        md,
        definition,
        incremental=Incremental(key=key, sources=sources, **options),
        **kw,
    )


def refused(match: str, **kw: Any) -> DefinitionError:
    with pytest.raises(DefinitionError, match=match) as info:
        declare(**kw)
    assert "'mv_daily'" in str(info.value)
    return info.value


def test_accepted_declaration():
    d = build_dashboard()
    assert d.mv_daily.incremental is not None
    assert d.mv_daily.incremental.key == ("day",)
    assert d.mv_daily.unique_key == ("day",)
    assert [c.name for c in d.mv_daily.table.primary_key] == ["day"]
    assert d.mv_daily.incremental.full_refresh_above == 0.25
    # No separate unique index: the primary key is the one index on the key.
    assert d.mv_daily.indexes == set()
    assert "Incremental(key='day'" in repr(d.mv_daily.incremental)


def test_plain_views_have_no_incremental():
    md = sa.MetaData()
    t = events_table(md)
    mv = MaterializedView("mv", md, sa.select(t.c.user_id))
    assert mv.incremental is None


def test_key_must_be_a_view_column():
    refused(
        r"key='nope' must name distinct columns of the view \(those are \['day', 'n'\]\)",
        key="nope",
    )
    refused("must name distinct columns", key=["day", "day"])


def test_key_must_be_grouped():
    refused(
        "no GROUP BY",
        definition=lambda e, day: sa.select(day.label("day"), e.c.user_id),
    )
    refused(
        "key column 'day' is not a GROUP BY expression",
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n"))
            .group_by(day, e.c.user_id)
            .group_by(None)
            .group_by(e.c.user_id)
        ),
    )


def test_unmapped_and_unread_sources():
    md = sa.MetaData()
    users = sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True))
    error = refused(
        r"reads \['users'\] but sources= gives no bucket",
        md=md,
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n"))
            .select_from(e.join(users, users.c.id == e.c.user_id))
            .group_by(day)
        ),
    )
    assert "sources={users:" in str(error)
    refused(
        "maps table 'users', which the definition does not read",
        md=md,
        sources=lambda e, day: {e: day, users: users.c.id},
    )


@pytest.mark.parametrize(
    "bucket, why",
    [
        (lambda e: sa.cast(sa.func.date_trunc("day", e.c.created_at), sa.Date), "date_trunc"),
        (lambda e: sa.cast(e.c.created_at, sa.Date), "CAST"),
        (lambda e: sa.extract("day", e.c.created_at), "extract"),
        (lambda e: sa.func.to_char(e.c.created_at, "YYYY-MM-DD", type_=sa.Text), "to_char"),
    ],
)
def test_time_zone_dependent_buckets_are_refused(bucket, why):
    def definition(e, _day):
        b = bucket(e)
        return sa.select(b.label("day"), sa.func.count().label("n")).group_by(b)

    error = refused(
        "depends on the session's TimeZone",
        definition=definition,
        sources=lambda e, _d: {e: bucket(e)},
    )
    assert why in str(error)
    assert 'sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)' in str(error)


def test_timestamp_without_zone_is_fine():
    def definition(e, _day):
        b = sa.cast(sa.func.date_trunc("day", e.c.local_at), sa.Date)
        return sa.select(b.label("day"), sa.func.count().label("n")).group_by(b)

    mv = declare(
        definition=definition,
        sources=lambda e, _d: {e: sa.cast(sa.func.date_trunc("day", e.c.local_at), sa.Date)},
    )
    assert mv.incremental is not None


@pytest.mark.parametrize("fn", ["now", "random", "clock_timestamp", "current_date"])
def test_not_repeatable_buckets_are_refused(fn):
    def bucket(e):
        return e.c.user_id + sa.cast(getattr(sa.func, fn)(), sa.Integer)

    def definition(e, _day):
        b = bucket(e)
        return sa.select(b.label("day"), sa.func.count().label("n")).group_by(b)

    refused(
        "not IMMUTABLE|changes without any write",
        definition=definition,
        sources=lambda e, _d: {e: bucket(e)},
    )


def test_bucket_must_be_the_key_expression():
    refused(
        "is not the expression of key column 'day'",
        sources=lambda e, _d: {e: sa.cast(sa.func.timezone("UTC", e.c.local_at), sa.Date)},
    )


def test_bucket_must_read_its_own_table():
    refused("reads none of its columns", sources=lambda e, _d: {e: sa.literal(1)})


@pytest.mark.parametrize(
    "where, what",
    [
        (lambda e: e.c.created_at > sa.func.now() - sa.text("interval '90 days'"), "now()"),
        (lambda e: e.c.created_at > sa.func.current_date(), "current_date()"),
        (lambda e: sa.text("created_at > now()"), "now"),
    ],
)
def test_now_relative_definitions_are_refused(where, what):
    error = refused(
        "changes without any write",
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n")).where(where(e)).group_by(day)
        ),
    )
    assert what in str(error)
    assert "filter when reading" in str(error)


def test_order_limit_window_subqueries_are_refused():
    refused(
        "ORDER BY",
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n")).group_by(day).order_by(day)
        ),
    )
    refused(
        "LIMIT / OFFSET",
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n")).group_by(day).limit(10)
        ),
    )
    refused(
        "window functions",
        definition=lambda e, day: sa.select(
            day.label("day"), sa.func.sum(sa.func.count()).over().label("n")
        ).group_by(day),
    )
    refused(
        "subquery",
        definition=lambda e, day: (
            sa.select(day.label("day"), sa.func.count().label("n"))
            .where(e.c.user_id.in_(sa.select(e.c.user_id).where(e.c.id < 10)))
            .group_by(day)
        ),
    )


def test_options_are_checked():
    for bad in (0, -1, 1.5, "x", True):
        refused("full_refresh_above=.* must be a fraction in \\(0, 1\\]", full_refresh_above=bad)
    refused("needs a managed view", managed=False)
    refused("track_changes=True is redundant", track_changes=True)
    refused("with_data=False is not supported", with_data=False)
    refused(
        "needs a select\\(\\) definition",
        definition="SELECT 1 AS day",
        columns=[sa.Column("day", sa.Integer)],
    )
    refused(
        "unique_key=.* differs from the incremental key",
        definition=lambda e, day: sa.select(
            day.label("day"), e.c.user_id, sa.func.count().label("n")
        ).group_by(day, e.c.user_id),
        unique_key="user_id",
    )
    with pytest.raises(DefinitionError, match="incremental= takes an Incremental"):
        MaterializedView("mv", sa.MetaData(), sa.select(sa.literal(1).label("x")), incremental=1)


def test_refresh_statement_names_refresh_views():
    d = build_dashboard()
    with pytest.raises(IncrementalRefreshError, match="refresh_views") as info:
        refresh(d.mv_daily)
    assert "'mv_daily'" in str(info.value)


def test_create_table_ddl():
    from sqlalchemy_matview.ddl import CreateIncrementalTable

    d = build_dashboard()
    sql = str(CreateIncrementalTable(d.mv_daily).compile(dialect=postgresql.dialect()))
    assert sql.startswith("CREATE TABLE mv_daily (day, events, unique_users, revenue) AS SELECT")
    assert sql.endswith("WITH NO DATA")
