"""Definitions as users write them, created on a real server: what the views hold."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import sqlalchemy as sa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql as pg

from sqlalchemy_matview import CreateMaterializedView, MaterializedView
from sqlalchemy_matview.compare import compare_views


def populated(conn: sa.Connection, name: str) -> bool:
    return bool(
        conn.scalar(sa.text("SELECT relispopulated FROM pg_class WHERE relname = :n"), {"n": name})
    )


def column_types(conn: sa.Connection, name: str) -> dict[str, str]:
    rows = conn.execute(
        sa.text(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = CAST(:n AS regclass) AND attnum > 0 ORDER BY attnum"
        ),
        {"n": name},
    )
    return {str(a): str(t) for a, t in rows}


def test_sql_as_pasted_from_psql(engine: sa.Engine) -> None:
    md = sa.MetaData()
    customers = sa.Table("customers", md, sa.Column("id", sa.Integer, primary_key=True))
    ids = [sa.Column("id", sa.Integer)]
    MaterializedView(
        "v_semicolon", md, "SELECT id FROM customers;", columns=ids, depends_on=[customers]
    )
    MaterializedView(
        "v_comment",
        md,
        "SELECT id FROM customers -- ids",
        columns=ids,
        with_data=False,
        depends_on=[customers],
    )
    MaterializedView(
        "v_block",
        md,
        sa.text("SELECT id FROM customers /* ids */ ;\n"),
        columns=ids,
        with_data=False,
        depends_on=[customers],
    )
    MaterializedView("v_colons", md, "SELECT 'x :y::z' AS s", columns=[sa.Column("s", sa.Text)])
    MaterializedView(
        "v_colons_text", md, sa.text("SELECT 'x :y::z' AS s"), columns=[sa.Column("s", sa.Text)]
    )
    MaterializedView(
        "v_json", md, """SELECT '{"a":1}'::jsonb AS j""", columns=[sa.Column("j", pg.JSONB)]
    )
    md.create_all(engine)
    with engine.connect() as conn:
        assert populated(conn, "v_semicolon")
        # WITH NO DATA did not end up inside the comment.
        assert not populated(conn, "v_comment")
        assert not populated(conn, "v_block")
        assert conn.scalar(sa.text("SELECT s FROM v_colons")) == "x :y::z"
        assert conn.scalar(sa.text("SELECT s FROM v_colons_text")) == "x :y::z"
        assert conn.scalar(sa.text("SELECT j FROM v_json")) == {"a": 1}
        assert compare_views(conn, md) == []


def test_jsonb_and_literals_of_postgresql_types(engine: sa.Engine) -> None:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("payload", pg.JSONB),
        sa.Column("tags", pg.ARRAY(sa.Text)),
        sa.Column("at", sa.Date),
    )
    kind = pg.ENUM("a", "b", name="kind_enum", metadata=md)
    MaterializedView(
        "v_german",
        md,
        sa.select(events.c.id).where(
            events.c.payload.contains({"country": "de"}),
            events.c.tags.overlap(["x", "it's"]),
            events.c.at > dt.date(2024, 1, 1),
        ),
    )
    values: dict[str, tuple[Any, Any, str]] = {
        "d": (dt.date(2024, 1, 2), sa.Date, "date"),
        "tstz": (
            dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            sa.DateTime(timezone=True),
            "timestamp with time zone",
        ),
        "ts": (dt.datetime(2024, 1, 2, 3, 4, 5), sa.DateTime, "timestamp without time zone"),
        "t": (dt.time(12, 30), sa.Time, "time without time zone"),
        "u": (uuid.UUID(int=5), sa.Uuid, "uuid"),
        "iv": (dt.timedelta(days=1, hours=2), sa.Interval, "interval"),
        "k": ("a", kind, "kind_enum"),
        "n": (decimal.Decimal("10.50"), sa.Numeric(10, 2), "numeric"),
        "arr": ([1, 2], pg.ARRAY(sa.Integer), "integer[]"),
        "empty": ([], pg.ARRAY(sa.Text), "text[]"),
        "jb": ({"a": [1, "x'y"], "b": None}, pg.JSONB, "jsonb"),
        "js": ({"a": 1}, sa.JSON, "json"),
        "b": (b"\x00ab'", sa.LargeBinary, "bytea"),
    }
    MaterializedView(
        "v_literals",
        md,
        sa.select(*(sa.literal(v, t).label(k) for k, (v, t, _) in values.items())),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            events.insert(),
            [
                {"payload": {"country": "de"}, "tags": ["it's"], "at": dt.date(2024, 2, 1)},
                {"payload": {"country": "fr"}, "tags": ["it's"], "at": dt.date(2024, 2, 1)},
                {"payload": {"country": "de"}, "tags": ["y"], "at": dt.date(2024, 2, 1)},
            ],
        )
        conn.execute(sa.text("REFRESH MATERIALIZED VIEW v_german"))
        assert conn.scalars(sa.text("SELECT id FROM v_german")).all() == [1]
        assert column_types(conn, "v_literals") == {k: t for k, (_, _, t) in values.items()}
        row = conn.execute(sa.text("SELECT * FROM v_literals")).mappings().one()
        assert dict(row) == {k: v for k, (v, _, _) in values.items()}
        assert compare_views(conn, md) == []


def test_compound_selects(engine: sa.Engine) -> None:
    md = sa.MetaData()
    a = sa.Table("a", md, sa.Column("id", sa.Integer, primary_key=True))
    b = sa.Table("b", md, sa.Column("id", sa.Integer, primary_key=True))
    expected = {
        "v_union": [1, 2, 3],
        "v_union_all": [1, 2, 2, 3],
        "v_intersect": [2],
        "v_except": [1],
    }
    for name in expected:
        compound = getattr(sa, name[2:] if name != "v_except" else "except_")
        MaterializedView(name, md, compound(sa.select(a.c.id), sa.select(b.c.id)).order_by("id"))
    with engine.begin() as conn:
        md.create_all(conn)
        conn.execute(a.insert(), [{"id": 1}, {"id": 2}])
        conn.execute(b.insert(), [{"id": 2}, {"id": 3}])
        for name, ids in expected.items():
            conn.execute(sa.text(f"REFRESH MATERIALIZED VIEW {name}"))
            assert conn.scalars(sa.text(f"SELECT id FROM {name}")).all() == ids
        assert compare_views(conn, md) == []


# -- property: a literal in a str definition comes back exactly ------------------------------

_SPECIALS = [*":'\"\\$-/*;E\n\t ()x0_", "::", "--", "/*", "*/", "$$", "$q$", ":a", "\\'"]
_TEXT = st.lists(
    st.one_of(
        st.sampled_from(_SPECIALS),
        st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
    ),
    max_size=12,
).map("".join)


def _standard(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _escaped(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dollar(value: str) -> str:
    n = 0
    while True:
        tag = f"$t{n}$"
        # The body must not close early: the tag first occurs where it is meant to.
        if (value + tag).find(tag) == len(value):
            return f"{tag}{value}{tag}"
        n += 1


def test_literals_in_str_definitions_come_back_exactly(engine: sa.Engine) -> None:
    @settings(max_examples=200)
    @example(value="x :y::z", quote=_standard, end="")
    @example(value="C:\\:dir", quote=_standard, end="")
    @example(value="\\:a", quote=_escaped, end=";")
    @example(value=":a $$ :b", quote=_dollar, end="")
    @given(
        value=_TEXT,
        quote=st.sampled_from([_standard, _escaped, _dollar]),
        end=st.sampled_from(["", ";", " ;\n", " -- :a 'b", " /* :x */ ;", "\n-- e\n"]),
    )
    def check(value: str, quote: Any, end: str) -> None:
        md = sa.MetaData()
        view = MaterializedView(
            "v_literal", md, f"SELECT {quote(value)} AS s{end}", columns=[sa.Column("s", sa.Text)]
        )
        with engine.connect() as conn:
            conn.execute(CreateMaterializedView(view))
            assert conn.scalar(sa.text("SELECT s FROM v_literal")) == value
            assert compare_views(conn, md) == []
            conn.rollback()

    check()
