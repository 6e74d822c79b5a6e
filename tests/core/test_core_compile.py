"""What the DDL constructs and refresh() compile to. No database needed."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import CompileError
from sqlalchemy.orm import DeclarativeBase

from sqlalchemy_matview import (
    CommentOnMaterializedView,
    ConcurrentRefreshError,
    CreateMaterializedView,
    DropMaterializedView,
    MaterializedView,
    RefreshMaterializedView,
    UnsupportedDialectError,
    refresh,
)

PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def sql(element: sa.ClauseElement) -> str:
    return str(element.compile(dialect=PG))


@pytest.fixture
def md() -> sa.MetaData:
    return sa.MetaData()


@pytest.fixture
def src(md: sa.MetaData) -> sa.Table:
    return sa.Table("src", md, sa.Column("id", sa.Integer), sa.Column("kind", sa.String))


def test_create_from_select_renders_literals_and_columns(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView(
        "mv",
        md,
        sa.select(src.c.id, src.c.kind).where(src.c.kind == "it's"),
        unique_key="id",
        with_data=False,
    )
    assert sql(CreateMaterializedView(mv)) == (
        "CREATE MATERIALIZED VIEW mv (id, kind) AS SELECT src.id, src.kind \n"
        "FROM src \nWHERE src.kind = 'it''s' WITH NO DATA"
    )
    assert sql(CreateMaterializedView(mv, if_not_exists=True)).startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS mv (id, kind) AS"
    )


def test_create_from_name_and_sql() -> None:
    statement = CreateMaterializedView("Mixed Case", "SELECT 1 AS a, '00:00'::time", schema="s")
    assert sql(statement) == (
        "CREATE MATERIALIZED VIEW s.\"Mixed Case\" AS SELECT 1 AS a, '00:00'::time WITH DATA"
    )
    with pytest.raises(TypeError, match="definition"):
        CreateMaterializedView("x")


def test_drop_and_comment(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id), schema="rep", comment="a 'quoted' note")
    assert sql(DropMaterializedView(mv)) == "DROP MATERIALIZED VIEW rep.mv"
    assert (
        sql(DropMaterializedView("mv", schema="rep", if_exists=True, cascade=True))
        == "DROP MATERIALIZED VIEW IF EXISTS rep.mv CASCADE"
    )
    assert sql(CommentOnMaterializedView(mv)) == (
        "COMMENT ON MATERIALIZED VIEW rep.mv IS 'a ''quoted'' note'"
    )
    assert sql(CommentOnMaterializedView("mv", None)) == "COMMENT ON MATERIALIZED VIEW mv IS NULL"


def test_refresh_variants(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id), unique_key="id")
    assert sql(refresh(mv)) == "REFRESH MATERIALIZED VIEW CONCURRENTLY mv"
    assert sql(refresh(mv.table, concurrently=False)) == "REFRESH MATERIALIZED VIEW mv"
    assert (
        sql(refresh(mv, concurrently=False, with_data=False))
        == "REFRESH MATERIALIZED VIEW mv WITH NO DATA"
    )
    assert sql(refresh('Weird"; DROP TABLE x; --', schema="Sch")) == (
        'REFRESH MATERIALIZED VIEW CONCURRENTLY "Sch"."Weird""; DROP TABLE x; --"'
    )


def test_refresh_accepts_an_orm_class(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id), unique_key="id")

    class Base(DeclarativeBase):
        metadata = md

    class Row(Base):
        __table__ = mv.table

    assert sql(refresh(Row)) == "REFRESH MATERIALIZED VIEW CONCURRENTLY mv"


def test_concurrently_without_unique_index_fails_before_sql(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id, src.c.kind))
    with pytest.raises(ConcurrentRefreshError) as info:
        refresh(mv)
    assert "'mv'" in str(info.value) and "unique_key" in str(info.value)
    assert sql(refresh(mv, concurrently=False)) == "REFRESH MATERIALIZED VIEW mv"


def test_only_a_plain_full_unique_index_qualifies(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id, src.c.kind))
    sa.Index("partial", mv.c.id, unique=True, postgresql_where=mv.c.id > 0)
    sa.Index("expr", sa.func.lower(mv.c.kind), unique=True)
    sa.Index("plain_not_unique", mv.c.kind)
    with pytest.raises(ConcurrentRefreshError):
        refresh(mv)
    sa.Index("good", mv.c.id, mv.c.kind, unique=True)
    assert sql(refresh(mv)) == "REFRESH MATERIALIZED VIEW CONCURRENTLY mv"


def test_concurrently_with_no_data_is_an_error(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id), unique_key="id")
    with pytest.raises(ConcurrentRefreshError, match="WITH NO DATA"):
        refresh(mv, with_data=False)
    with pytest.raises(ConcurrentRefreshError, match="WITH NO DATA"):
        refresh("by_name", with_data=False)


def test_refresh_rejects_other_targets(md: sa.MetaData) -> None:
    class NotMapped:
        pass

    with pytest.raises(TypeError):
        refresh(NotMapped)
    with pytest.raises(TypeError):
        refresh(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        refresh("")


@pytest.mark.parametrize("dialect", [sqlite.dialect(), mysql.dialect()])  # type: ignore[no-untyped-call]
def test_other_dialects_get_a_compile_error_naming_postgresql(
    md: sa.MetaData, src: sa.Table, dialect: sa.Dialect
) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id), unique_key="id")
    for element in (
        refresh(mv),
        CreateMaterializedView(mv),
        DropMaterializedView(mv),
        RefreshMaterializedView("x"),
    ):
        with pytest.raises(CompileError, match="PostgreSQL") as info:
            element.compile(dialect=dialect)
        assert isinstance(info.value, UnsupportedDialectError)


def test_create_table_of_a_view_compiles_to_the_view(md: sa.MetaData, src: sa.Table) -> None:
    mv = MaterializedView("mv", md, sa.select(src.c.id))
    from sqlalchemy.schema import CreateTable

    plain = sql(CreateTable(src))
    assert plain.strip().startswith("CREATE TABLE src")
    creator = getattr(mv.table, "_creator_ddl", None)
    if creator is not None:  # 2.1: the Table carries its own creation DDL
        assert isinstance(creator, CreateMaterializedView)
    else:  # 2.0: CREATE TABLE compilation is wrapped for view tables only
        assert sql(CreateTable(mv.table)).startswith("CREATE MATERIALIZED VIEW mv")
