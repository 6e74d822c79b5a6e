"""Definitions as users write them: SQL ends, colons, bind parameters, literals, compounds.

No database here; ``test_core_definitions_db.py`` checks what PostgreSQL makes of them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from sqlalchemy_matview import CreateMaterializedView, DefinitionError, MaterializedView
from sqlalchemy_matview.query import SQLText, definition_sql
from sqlalchemy_matview.sqltext import (
    MultipleStatementsError,
    context_at,
    statement_body,
    tokens,
    top_level_items,
)

COLUMNS = [sa.Column("id", sa.Integer)]


def ddl(view: MaterializedView) -> str:
    return str(CreateMaterializedView(view).compile(dialect=pg.dialect()))


@pytest.fixture
def md() -> sa.MetaData:
    return sa.MetaData()


@pytest.fixture
def events(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text),
        sa.Column("payload", pg.JSONB),
        sa.Column("tags", pg.ARRAY(sa.Text)),
    )


# -- the lexer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        ("'it''s'", ["string"]),
        ("E'a\\'b' x", ["word", "string", "space", "word"]),
        ("e'\\\\' x", ["word", "string", "space", "word"]),
        # Without E, a backslash is an ordinary character: the literal ends at the 2nd quote.
        ("'a\\' x'", ["string", "space", "word", "string"]),
        ("$$a'b$$ x", ["string", "space", "word"]),
        ("$fn$ $$ ' $fn$ x", ["string", "space", "word"]),
        ('"a""b" x', ["ident", "space", "word"]),
        ("/* a /* nested */ still */ x", ["comment", "space", "word"]),
        ("a -- b\nc", ["word", "space", "comment", "space", "word"]),
        ("a$b$ c", ["word", "word", "word", "word", "space", "word"]),
        ("$1", ["word", "word"]),
        ("f(a, b);", ["word", "punct", "word", "punct", "space", "word", "punct", "punct"]),
    ],
)
def test_tokens(sql: str, kinds: list[str]) -> None:
    found = list(tokens(sql))
    assert [t.kind for t in found] == kinds
    assert "".join(t.text for t in found) == sql


@pytest.mark.parametrize(
    ("sql", "body"),
    [
        ("SELECT 1", "SELECT 1"),
        ("SELECT 1;", "SELECT 1"),
        ("SELECT 1 ;; \n\t", "SELECT 1"),
        ("SELECT 1 -- one", "SELECT 1"),
        ("SELECT 1 /* one */", "SELECT 1"),
        ("SELECT 1; -- a\n/* b */ ; ", "SELECT 1"),
        ("-- lead\nSELECT 1", "-- lead\nSELECT 1"),
        ("SELECT ';' AS s", "SELECT ';' AS s"),
        ("SELECT $$;$$ AS s -- c", "SELECT $$;$$ AS s"),
        ("SELECT '-- not a comment'", "SELECT '-- not a comment'"),
        ("  ", ""),
    ],
)
def test_statement_body(sql: str, body: str) -> None:
    assert statement_body(sql) == body


def test_statement_body_refuses_two_statements() -> None:
    with pytest.raises(MultipleStatementsError, match="DROP TABLE"):
        statement_body("SELECT 1; DROP TABLE events")


def test_context_at() -> None:
    sql = "SELECT 'a :x' AS \":y\" -- :z\n, :w"
    assert context_at(sql, sql.index(":x")) == "string"
    assert context_at(sql, sql.index(":y")) == "ident"
    assert context_at(sql, sql.index(":z")) == "comment"
    assert context_at(sql, sql.index(":w")) == "word"


def test_top_level_items() -> None:
    sql = 'X (a DESC, lower((b)::text) text_pattern_ops, "c,d" COLLATE "C", \'e)\') tail'
    items, end = top_level_items(sql, 2)
    assert items == ["a DESC", "lower((b)::text) text_pattern_ops", '"c,d" COLLATE "C"', "'e)'"]
    assert sql[end:] == " tail"


# -- SQL ends and WITH [NO] DATA -------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM customers;",
        "SELECT id FROM customers -- ids",
        "SELECT id FROM customers /* ids */",
        "SELECT id FROM customers ; -- pasted from psql\n\n",
        "\n  SELECT id FROM customers\n  ",
    ],
)
@pytest.mark.parametrize("wrap", [str, sa.text])
def test_sql_ends_are_cut_and_with_data_is_kept(md: sa.MetaData, sql: str, wrap: Any) -> None:
    view = MaterializedView("v", md, wrap(sql), columns=COLUMNS, with_data=False)
    assert view.sql == "SELECT id FROM customers"
    statement = ddl(view)
    assert statement.endswith(" SELECT id FROM customers WITH NO DATA")
    assert ";" not in statement and "ids" not in statement


def test_two_statements_are_refused_at_declaration(md: sa.MetaData) -> None:
    with pytest.raises(DefinitionError, match=r"'v'.*one statement.*DROP TABLE"):
        MaterializedView("v", md, "SELECT 1 AS id; DROP TABLE t", columns=COLUMNS)


@pytest.mark.parametrize("sql", ["", "  ;  ", "-- nothing"])
def test_empty_sql_is_refused(md: sa.MetaData, sql: str) -> None:
    with pytest.raises(DefinitionError, match=r"'v'.*empty"):
        MaterializedView("v", md, sql, columns=COLUMNS)


# -- colons ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'x :y::z' AS s",
        "SELECT E'\\\\:a' AS s",
        "SELECT 'C:\\:dir' AS s",
        "SELECT $q$:a :b$q$ AS s",
        'SELECT 1 AS ":col"',
        "SELECT tags[1 :2] AS s FROM events -- :c",
        "SELECT '{\"a\":1}'::jsonb AS s /* :x */",
    ],
)
def test_str_sql_is_used_exactly_as_written(md: sa.MetaData, sql: str) -> None:
    view = MaterializedView("v", md, sql, columns=[sa.Column("s", sa.Text)])
    assert isinstance(view.definition, SQLText)
    assert view.sql == statement_body(sql)
    assert f"AS {statement_body(sql)} WITH DATA" in ddl(view)


def test_text_bind_parameter_without_value_is_refused(md: sa.MetaData) -> None:
    with pytest.raises(DefinitionError) as err:
        MaterializedView(
            "v", md, sa.text("""SELECT '{"a":1}'::jsonb AS j"""), columns=[sa.Column("j", pg.JSONB)]
        )
    message = str(err.value)
    assert "'v'" in message and "':1'" in message and "inside a string literal" in message
    assert "plain str" in message and "'\\:1'" in message


def test_text_bind_parameter_outside_literals(md: sa.MetaData) -> None:
    with pytest.raises(DefinitionError, match=r"':min'.*\.bindparams\(min=\.\.\.\)"):
        MaterializedView("v", md, sa.text("SELECT id FROM events WHERE id > :min"), columns=COLUMNS)


def test_text_bind_parameter_with_value_is_rendered(md: sa.MetaData) -> None:
    view = MaterializedView(
        "v",
        md,
        sa.text("SELECT id FROM events WHERE kind = :kind AND '{\"a\"\\:1}' <> ''").bindparams(
            kind="it's"
        ),
        columns=COLUMNS,
    )
    assert view.sql == "SELECT id FROM events WHERE kind = 'it''s' AND '{\"a\":1}' <> ''"


def test_select_bind_parameter_without_value_is_refused(md: sa.MetaData, events: sa.Table) -> None:
    with pytest.raises(DefinitionError, match=r"'v'.*'since' has no value.*sa\.literal"):
        MaterializedView("v", md, sa.select(events.c.id).where(events.c.id > sa.bindparam("since")))


# -- select(): compiled at declaration, literal values of PostgreSQL types -------------------


class Unrenderable(sa.types.UserDefinedType[Any]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "point"


def test_uncompilable_select_fails_at_declaration(md: sa.MetaData, events: sa.Table) -> None:
    point = sa.literal((1, 2), Unrenderable())
    with pytest.raises(DefinitionError, match=r"'v'.*cannot be compiled for PostgreSQL.*"):
        MaterializedView("v", md, sa.select(events.c.id).where(point.is_not(None)))


def test_jsonb_contains_renders(md: sa.MetaData, events: sa.Table) -> None:
    view = MaterializedView(
        "v", md, sa.select(events.c.id).where(events.c.payload.contains({"country": "de"}))
    )
    assert view.sql.endswith("""WHERE events.payload @> CAST('{"country": "de"}' AS JSONB)""")


@pytest.mark.parametrize(
    ("value", "type_", "sql"),
    [
        ({"a": [1, "it's"]}, pg.JSONB, """CAST('{"a": [1, "it''s"]}' AS JSONB)"""),
        ([1, "x"], sa.JSON, """CAST('[1, "x"]' AS JSON)"""),
        (["a", "b'c"], pg.ARRAY(sa.Text), "CAST(ARRAY['a', 'b''c'] AS TEXT[])"),
        ([], pg.ARRAY(sa.Integer), "CAST(ARRAY[] AS INTEGER[])"),
        (uuid.UUID(int=5), sa.Uuid, "CAST('00000000-0000-0000-0000-000000000005' AS UUID)"),
        (dt.date(2024, 1, 2), sa.Date, "CAST('2024-01-02' AS DATE)"),
        (
            dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            sa.DateTime(timezone=True),
            "CAST('2024-01-02 03:04:05+00:00' AS TIMESTAMP WITH TIME ZONE)",
        ),
        (dt.time(12, 30), sa.Time, "CAST('12:30:00' AS TIME WITHOUT TIME ZONE)"),
        (dt.timedelta(days=1, hours=2), sa.Interval, "make_interval(secs=>93600.0)"),
        ("a", pg.ENUM("a", "b", name="kind"), "CAST('a' AS kind)"),
        ("a", sa.Enum("a", "b", name="kind", native_enum=False), "'a'"),
        (__import__("decimal").Decimal("10.50"), sa.Numeric(10, 2), "10.50"),
        (b"\x00ab", sa.LargeBinary, "CAST('\\x006162' AS BYTEA)"),
        ("it's 100%", sa.Text, "'it''s 100%'"),
        # A backslash is an ordinary character (standard_conforming_strings), on 2.0 too.
        ("C:\\dir", sa.Text, "'C:\\dir'"),
    ],
)
def test_literal_values_of_postgresql_types(
    md: sa.MetaData, value: Any, type_: Any, sql: str
) -> None:
    view = MaterializedView("v", md, sa.select(sa.literal(value, type_).label("x")))
    assert view.sql == f"SELECT {sql} AS x"


# -- compound selects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compound", "keyword"),
    [
        (sa.union, "UNION"),
        (sa.union_all, "UNION ALL"),
        (sa.intersect, "INTERSECT"),
        (sa.intersect_all, "INTERSECT ALL"),
        (sa.except_, "EXCEPT"),
        (sa.except_all, "EXCEPT ALL"),
    ],
)
def test_compound_selects_are_accepted(
    md: sa.MetaData, events: sa.Table, compound: Any, keyword: str
) -> None:
    users = sa.Table("users", md, sa.Column("id", sa.Integer), sa.Column("name", sa.Text))
    query = compound(
        sa.select(events.c.id, events.c.kind), sa.select(users.c.id, users.c.name)
    ).order_by("id")
    view = MaterializedView("v", md, query, unique_key="id")
    assert [(c.name, type(c.type)) for c in view.c] == [("id", sa.Integer), ("kind", sa.Text)]
    assert set(view.sources) == {events, users}
    assert view.table in {t for t in md.sorted_tables}
    assert f" {keyword} SELECT users.id" in view.sql
    assert md.sorted_tables.index(view.table) > md.sorted_tables.index(users)


def test_textual_select_infers_columns(md: sa.MetaData) -> None:
    query = sa.text("SELECT 1 AS one, 'a' AS letter;").columns(one=sa.Integer, letter=sa.Text)
    view = MaterializedView("v", md, query)
    assert [c.name for c in view.c] == ["one", "letter"]
    assert view.sql == "SELECT 1 AS one, 'a' AS letter"


def test_subquery_is_refused_with_a_hint(md: sa.MetaData, events: sa.Table) -> None:
    with pytest.raises(TypeError, match=r"not its \.subquery"):
        MaterializedView("v", md, sa.select(events.c.id).subquery())  # type: ignore[arg-type]


def test_definition_sql_of_str_is_the_sql() -> None:
    assert definition_sql("SELECT ':a' AS s ; -- x") == "SELECT ':a' AS s"
