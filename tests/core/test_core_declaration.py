"""Declaring views: inferred columns, errors at declaration time, names. No database needed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import (
    DefinitionError,
    MaterializedView,
    MaterializedViewError,
    materialized_view_of,
    materialized_views,
    unique_key_index_name,
)


@pytest.fixture
def md() -> sa.MetaData:
    return sa.MetaData()


@pytest.fixture
def events(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("user_id", sa.Integer),
        sa.Column("amount", sa.Numeric(12, 2)),
    )


def test_columns_and_types_inferred_from_select(md: sa.MetaData, events: sa.Table) -> None:
    day = sa.cast(sa.func.date_trunc("day", events.c.created_at), sa.Date)
    mv = MaterializedView(
        "mv",
        md,
        sa.select(
            day.label("day"), sa.func.count().label("n"), sa.func.sum(events.c.amount)
        ).group_by(day),
        unique_key="day",
    )
    assert [c.name for c in mv.c] == ["day", "n", "sum"]
    assert isinstance(mv.c.day.type, sa.Date)
    assert isinstance(mv.c.n.type, sa.Integer)
    assert isinstance(mv.c.sum.type, sa.Numeric)
    assert mv.unique_key == ("day",)
    assert [c.name for c in mv.table.primary_key] == ["day"]
    assert mv.table in md.tables.values()
    assert mv.table.c is mv.c or list(mv.table.c) == list(mv.c)
    assert mv.name == "mv" and mv.schema is None and mv.fullname == "mv"
    assert mv.with_data and mv.managed
    assert mv.sources == (events,)


def test_unique_key_creates_a_named_unique_index(md: sa.MetaData, events: sa.Table) -> None:
    mv = MaterializedView(
        "mv", md, sa.select(events.c.id, events.c.user_id), unique_key=["id", "user_id"]
    )
    (index,) = mv.table.indexes
    assert index.unique and index.name == "mv_unique_key"
    assert [c.name for c in index.columns] == ["id", "user_id"]


def test_unique_key_index_name_fits_63_bytes() -> None:
    long_name = "é" * 31  # 62 bytes
    name = unique_key_index_name(long_name)
    assert len(name.encode()) <= 63
    assert name != unique_key_index_name("é" * 30 + "x")
    assert unique_key_index_name("short") == "short_unique_key"


def test_null_type_column_is_an_error_naming_view_and_column(
    md: sa.MetaData, events: sa.Table
) -> None:
    with pytest.raises(DefinitionError) as info:
        MaterializedView("mv", md, sa.select(sa.func.mystery(events.c.id).label("m")))
    message = str(info.value)
    assert "'mv'" in message and "'m'" in message and "sa.cast" in message
    assert isinstance(info.value, MaterializedViewError) and isinstance(info.value, ValueError)


def test_columns_override_fixes_an_untyped_column(md: sa.MetaData, events: sa.Table) -> None:
    mv = MaterializedView(
        "mv",
        md,
        sa.select(events.c.id, sa.func.mystery(events.c.id).label("m")),
        columns=[sa.Column("m", sa.Text)],
    )
    assert isinstance(mv.c.m.type, sa.Text)
    assert isinstance(mv.c.id.type, sa.Integer)


def test_columns_naming_unknown_column_is_an_error(md: sa.MetaData, events: sa.Table) -> None:
    with pytest.raises(DefinitionError, match="'nope'"):
        MaterializedView("mv", md, sa.select(events.c.id), columns=[sa.Column("nope", sa.Text)])


def test_text_definition_requires_columns(md: sa.MetaData) -> None:
    with pytest.raises(DefinitionError, match="columns="):
        MaterializedView("mv", md, sa.text("SELECT 1 AS one"))
    with pytest.raises(DefinitionError, match="columns="):
        MaterializedView("mv2", md, "SELECT 1 AS one")


def test_text_definition_with_columns(md: sa.MetaData, events: sa.Table) -> None:
    mv = MaterializedView(
        "mv",
        md,
        "SELECT 1 AS one, 'a:b' AS two",
        columns=[sa.Column("one", sa.Integer), sa.Column("two", sa.Text)],
        unique_key="one",
        depends_on=[events],
    )
    assert [c.name for c in mv.c] == ["one", "two"]
    assert isinstance(mv.definition, sa.TextClause)
    assert mv.sources == (events,)
    assert events in mv.table._extra_dependencies  # ordered after events by create_all


def test_unlabelled_expression_is_an_error(md: sa.MetaData, events: sa.Table) -> None:
    with pytest.raises(DefinitionError, match=r"\.label"):
        MaterializedView("mv", md, sa.select(events.c.id + 1))


def test_same_named_outputs_get_distinct_column_names(md: sa.MetaData, events: sa.Table) -> None:
    # As in a subquery, SQLAlchemy tells clashing names apart; the view's column list follows.
    other = sa.Table("other", md, sa.Column("id", sa.Integer))
    mv = MaterializedView("mv", md, sa.select(events.c.id, other.c.id).select_from(events))
    assert [c.name for c in mv.c] == ["id", "id_1"]


@pytest.mark.parametrize("key", ["missing", ["id", "missing"], []])
def test_bad_unique_key(md: sa.MetaData, events: sa.Table, key: object) -> None:
    with pytest.raises(DefinitionError, match="unique_key"):
        MaterializedView("mv", md, sa.select(events.c.id), unique_key=key)  # type: ignore[arg-type]


def test_declaring_the_same_view_twice_is_an_error(md: sa.MetaData, events: sa.Table) -> None:
    MaterializedView("mv", md, sa.select(events.c.id))
    with pytest.raises(DefinitionError, match="already declared"):
        MaterializedView("mv", md, sa.select(events.c.id))
    with pytest.raises(DefinitionError, match="table of that name"):
        MaterializedView("events", md, sa.select(events.c.id))


def test_name_longer_than_63_bytes_is_an_error(md: sa.MetaData, events: sa.Table) -> None:
    with pytest.raises(DefinitionError, match="63 bytes"):
        MaterializedView("v" * 64, md, sa.select(events.c.id))


def test_bad_definition_type(md: sa.MetaData) -> None:
    with pytest.raises(TypeError, match="select"):
        MaterializedView("mv", md, 42)  # type: ignore[arg-type]


def test_schema_defaults_to_metadata_schema(events: sa.Table) -> None:
    md = sa.MetaData(schema="reports")
    src = sa.Table("src", md, sa.Column("id", sa.Integer))
    mv = MaterializedView("mv", md, sa.select(src.c.id))
    assert mv.schema == "reports" and mv.fullname == "reports.mv"
    assert mv.table.key == "reports.mv"


def test_unmanaged_view_is_kept_out_of_the_metadata(md: sa.MetaData, events: sa.Table) -> None:
    mv = MaterializedView("legacy", md, sa.select(events.c.id), managed=False, unique_key="id")
    assert mv.table not in md.tables.values()
    assert materialized_views(md) == [mv]
    assert materialized_views(md, managed=True) == []
    assert materialized_view_of(mv.table) is mv
    with pytest.raises(DefinitionError, match="managed=False"):
        MaterializedView("t", md, sa.select(events.c.id), managed=False, track_changes=True)


def test_views_on_views_depend_on_each_other(md: sa.MetaData, events: sa.Table) -> None:
    first = MaterializedView("first", md, sa.select(events.c.id))
    second = MaterializedView("second", md, sa.select(first.c.id))
    order = [t.name for t in md.sorted_tables]
    assert order.index("events") < order.index("first") < order.index("second")
    assert second.sources == (first.table,)
