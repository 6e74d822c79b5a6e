"""Definitions that stress PostgreSQL's rewriting of view SQL (the no-false-positive corpus)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from sqlalchemy_matview import MaterializedView


def build_corpus() -> tuple[sa.MetaData, list[MaterializedView]]:
    md = sa.MetaData()
    users = sa.Table(
        "users", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text)
    )
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.ForeignKey("users.id")),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2)),
        sa.Column("payload", pg.JSONB),
        sa.Column("tags", pg.ARRAY(sa.Text)),
        sa.Column("mood", pg.ENUM("happy", "sad", name="mood")),
    )
    targets = sa.Table(
        "targets",
        md,
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("goal", sa.Integer),
        schema="reports",
    )
    camel = sa.Table(
        "CamelTable",
        md,
        sa.Column("Id", sa.Integer, primary_key=True),
        sa.Column("MixedCol", sa.Text),
    )
    views: list[MaterializedView] = []

    def mv(name: str, definition: object, **kw: object) -> MaterializedView:
        view = MaterializedView(name, md, definition, **kw)  # type: ignore[arg-type]
        views.append(view)
        return view

    day = sa.func.date_trunc("day", events.c.created_at)
    # 1. plain projection
    mv("c01_plain", sa.select(events.c.id, events.c.kind))
    # 2. aggregate + group by
    mv("c02_group", sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind))
    # 3. date_trunc + cast
    d = sa.cast(day, sa.Date)
    mv("c03_date_trunc", sa.select(d.label("day"), sa.func.count().label("n")).group_by(d))
    # 4. window function
    mv(
        "c04_window",
        sa.select(
            events.c.id,
            sa.func.row_number(type_=sa.BigInteger)
            .over(partition_by=events.c.user_id, order_by=events.c.created_at.desc())
            .label("rn"),
        ),
    )
    # 5. FILTER
    mv(
        "c05_filter",
        sa.select(
            events.c.user_id,
            sa.func.count(type_=sa.BigInteger).filter(events.c.kind == "click").label("clicks"),
        ).group_by(events.c.user_id),
    )
    # 6. DISTINCT ON
    mv(
        "c06_distinct_on",
        _distinct_on(sa.select(events.c.user_id, events.c.kind), events.c.user_id).order_by(
            events.c.user_id, events.c.created_at.desc()
        ),
    )
    # 7. CASE
    mv(
        "c07_case",
        sa.select(
            events.c.id,
            sa.case(
                (events.c.amount > 100, "big"), (events.c.amount > 10, "mid"), else_="small"
            ).label("size"),
        ),
    )
    # 8. interval arithmetic
    mv(
        "c08_interval",
        sa.select(events.c.id).where(
            events.c.created_at > sa.func.now() - sa.text("interval '7 days'")
        ),
    )
    # 9. arrays
    mv("c09_array", sa.select(events.c.id, events.c.tags[1].label("first_tag")))
    # 10. JSON operators
    mv(
        "c10_json",
        sa.select(
            events.c.id,
            events.c.payload["user"]["name"].astext.label("user_name"),
        ).where(events.c.payload.has_key("user")),
    )
    # 11. IN list
    mv("c11_in", sa.select(events.c.id).where(events.c.kind.in_(["a", "b", "c"])))
    # 12. string literal with quotes and a percent sign
    mv(
        "c12_quotes",
        sa.select(events.c.id).where(events.c.kind.like('it\'s 100% "fine"')),
    )
    # 13. UNION ALL
    union = sa.union_all(
        sa.select(events.c.id.label("ref"), sa.literal("event").label("src")),
        sa.select(users.c.id.label("ref"), sa.literal("user").label("src")),
    ).subquery()
    mv("c13_union_all", sa.select(union.c.ref, union.c.src))
    # 14. CTE
    cte = (
        sa.select(events.c.user_id, sa.func.count().label("n"))
        .group_by(events.c.user_id)
        .cte("per_user")
    )
    mv("c14_cte", sa.select(cte.c.user_id, cte.c.n).where(cte.c.n > 1))
    # 15. LATERAL
    lat = (
        sa.select(events.c.kind)
        .where(events.c.user_id == users.c.id)
        .order_by(events.c.created_at.desc())
        .limit(1)
        .lateral("last_event")
    )
    mv("c15_lateral", sa.select(users.c.id, lat.c.kind).select_from(users.join(lat, sa.true())))
    # 16. mixed-case quoted identifiers
    mv("c16_camel", sa.select(camel.c.Id, camel.c.MixedCol))
    # 17. schema-qualified source
    mv("c17_schema_src", sa.select(targets.c.kind, targets.c.goal))
    # 18. join across schemas
    j = (
        sa.select(events.c.kind, sa.func.count().label("n"), targets.c.goal)
        .select_from(events.join(targets, events.c.kind == targets.c.kind))
        .group_by(events.c.kind, targets.c.goal)
    )
    mv("c18_schema_join", j)
    # 19. view in another schema
    mv("c19_in_schema", sa.select(users.c.id, users.c.name), schema="reports")
    # 20. view on a view
    base = views[1]
    mv("c20_view_on_view", sa.select(base.c.kind, base.c.n).where(base.c.n > 5))
    # 21. bound parameters rendered as literals (numeric, bool, None)
    mv(
        "c21_literals",
        sa.select(events.c.id).where(
            sa.and_(events.c.amount >= 10.5, events.c.user_id != 3, events.c.payload.is_not(None))
        ),
    )
    # 22. coalesce / nullif
    mv(
        "c22_coalesce",
        sa.select(
            events.c.id, sa.func.coalesce(sa.func.nullif(events.c.kind, ""), "none").label("k")
        ),
    )
    # 23. HAVING + ORDER BY
    mv(
        "c23_having",
        sa.select(events.c.user_id, sa.func.sum(events.c.amount).label("total"))
        .group_by(events.c.user_id)
        .having(sa.func.sum(events.c.amount) > 0)
        .order_by(events.c.user_id),
    )
    # 24. EXISTS subquery
    mv(
        "c24_exists",
        sa.select(users.c.id).where(sa.exists().where(events.c.user_id == users.c.id)),
    )
    # 25. string functions and concatenation
    mv(
        "c25_concat",
        sa.select((users.c.name + " <" + sa.cast(users.c.id, sa.Text) + ">").label("label")),
    )
    # 26. extract / epoch
    mv("c26_extract", sa.select(events.c.id, sa.extract("epoch", events.c.created_at).label("ts")))
    # 27. text(): CTE, FILTER, casts, interval, quotes
    mv(
        "c27_text_cte",
        sa.text(
            "WITH per_day AS (SELECT date_trunc('day', created_at) AS day, kind FROM events)\n"
            "SELECT day, count(*) FILTER (WHERE kind = 'it''s') AS n FROM per_day "
            "WHERE day > now() - interval '1 month' GROUP BY day"
        ),
        columns=[sa.Column("day", sa.DateTime(timezone=True)), sa.Column("n", sa.BigInteger)],
        depends_on=[events],
    )
    # 28. text(): JSON operators and array literal, :: casts
    mv(
        "c28_text_json",
        sa.text(
            "select id, payload->>'user' as who, payload #> '{a,b}' as path, "
            "tags && ARRAY['x','y']::text[] as tagged, amount::int as amt from events"
        ),
        columns=[
            sa.Column("id", sa.Integer),
            sa.Column("who", sa.Text),
            sa.Column("path", pg.JSONB),
            sa.Column("tagged", sa.Boolean),
            sa.Column("amt", sa.Integer),
        ],
        depends_on=[events],
    )
    # 29. text(): column list renames output columns
    mv(
        "c29_text_renamed",
        "SELECT kind, count(*) FROM events GROUP BY kind",
        columns=[sa.Column("the_kind", sa.Text), sa.Column("how_many", sa.BigInteger)],
        depends_on=[events],
    )
    # 30. text(): UNION ALL + LATERAL + quoted mixed case
    mv(
        "c30_text_lateral",
        sa.text(
            "SELECT u.id, e.kind FROM users u CROSS JOIN LATERAL "
            "(SELECT kind FROM events WHERE user_id = u.id LIMIT 1) e "
            'UNION ALL SELECT "Id", "MixedCol" FROM "CamelTable"'
        ),
        columns=[sa.Column("id", sa.Integer), sa.Column("kind", sa.Text)],
        depends_on=[users, events, camel],
    )
    # 31. text(): schema-qualified, DISTINCT ON, CASE, IN list
    mv(
        "c31_text_misc",
        sa.text(
            "SELECT DISTINCT ON (t.kind) t.kind, CASE WHEN t.goal IN (1, 2, 3) THEN 'low' "
            "ELSE 'high' END AS level FROM reports.targets t ORDER BY t.kind, t.goal DESC"
        ),
        columns=[sa.Column("kind", sa.Text), sa.Column("level", sa.Text)],
        schema="reports",
        depends_on=[targets],
    )
    # 32. text(): window with frame + a colon inside a string literal
    mv(
        "c32_text_window",
        "SELECT id, sum(amount) OVER (ORDER BY created_at ROWS BETWEEN 2 PRECEDING AND CURRENT ROW)"
        " AS running, 'a:b' AS label FROM events",
        columns=[
            sa.Column("id", sa.Integer),
            sa.Column("running", sa.Numeric),
            sa.Column("label", sa.Text),
        ],
        depends_on=[events],
    )
    # 33. view on a text() view, with an index and comment
    mv(
        "c33_on_text_view",
        sa.select(views[28].c.the_kind).where(views[28].c.how_many > 0),
        unique_key="the_kind",
        comment="kinds with at least one event; it's refreshed hourly",
    )
    # 34. WITH NO DATA
    mv("c34_no_data", sa.select(users.c.id), with_data=False)
    # 35. cast to array / numeric precision / boolean expression
    mv(
        "c35_casts",
        sa.select(
            sa.cast(events.c.amount, sa.Numeric(10, 1)).label("amt"),
            sa.cast(sa.func.string_to_array(events.c.kind, ","), pg.ARRAY(sa.Text)).label("parts"),
            (events.c.amount.is_(None) | (events.c.amount < 0)).label("odd"),
        ),
    )
    # 36. text(): '::' casts and a colon inside a literal; an escaped colon in JSON
    mv(
        "c36_text_colons",
        sa.text("SELECT 'x :y::z' AS s, '{\"a\"\\:1}'::jsonb AS j, now()::date AS d"),
        columns=[sa.Column("s", sa.Text), sa.Column("j", pg.JSONB), sa.Column("d", sa.Date)],
    )
    # 37. str pasted from psql: colons, a final semicolon and comments
    mv(
        "c37_str_pasted",
        "SELECT id, kind FROM events WHERE kind <> 'a:b' AND payload ? 'x' ; -- pasted\n/* end */",
        columns=[sa.Column("id", sa.Integer), sa.Column("kind", sa.Text)],
        depends_on=[events],
    )
    # 38. JSONB containment and array overlap with Python values
    mv(
        "c38_jsonb_contains",
        sa.select(events.c.id).where(
            events.c.payload.contains({"country": "de", "tags": ["a", "it's"]}),
            events.c.tags.overlap(["x", "y"]),
        ),
    )
    # 39. literal values of PostgreSQL types in the select list
    mood = events.c.mood.type
    mv(
        "c39_literals",
        sa.select(
            sa.literal(dt.date(2024, 1, 2)).label("d"),
            sa.literal(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)).label("tstz"),
            sa.literal(dt.time(12, 30)).label("t"),
            sa.literal(uuid.UUID(int=5)).label("u"),
            sa.literal(dt.timedelta(days=1, hours=2)).label("iv"),
            sa.literal("happy", mood).label("m"),
            sa.literal(decimal.Decimal("10.50"), sa.Numeric(10, 2)).label("n"),
            sa.literal([1, 2], pg.ARRAY(sa.Integer)).label("arr"),
            sa.literal([], pg.ARRAY(sa.Text)).label("empty"),
            sa.literal({"a": [1, "x'y"]}, pg.JSONB).label("jb"),
            sa.literal({"a": 1}, sa.JSON).label("js"),
            sa.literal(b"\x00ab", sa.LargeBinary).label("b"),
        ),
    )
    # 40. UNION of two selects
    mv(
        "c40_union",
        sa.union(
            sa.select(events.c.user_id.label("ref")), sa.select(users.c.id.label("ref"))
        ).order_by("ref"),
    )
    # 41. INTERSECT / EXCEPT nested
    mv(
        "c41_intersect_except",
        sa.except_(
            sa.intersect(sa.select(events.c.user_id), sa.select(users.c.id)),
            sa.select(sa.literal(0, sa.Integer)),
        ),
    )
    # 42. text().columns(): columns inferred from a textual select
    mv(
        "c42_textual_select",
        sa.text("SELECT id, kind FROM events WHERE kind LIKE 'a%' -- ids\n").columns(
            id=sa.Integer, kind=sa.Text
        ),
        depends_on=[events],
    )
    # 43. every form of index on a view (see index_forms)
    index_forms(mv("c43_index_forms", forms_query(events), unique_key="id"))
    # 44. docs/declaring.md's example: an index on a DESC aggregate
    totals = mv(
        "c44_customer_totals",
        sa.select(events.c.kind, sa.func.sum(events.c.amount).label("spent")).group_by(
            events.c.kind
        ),
        unique_key="kind",
    )
    sa.Index("c44_customer_totals_spent", totals.c.spent.desc())
    return md, views


def forms_query(events: sa.Table) -> sa.Select[Any]:
    """The columns :data:`INDEX_FORMS` index, from a table like the corpus's ``events``."""
    span = sa.func.int4range(events.c.id, events.c.user_id, type_=pg.INT4RANGE)
    return sa.select(
        events.c.id,
        events.c.kind,
        events.c.amount,
        events.c.tags,
        events.c.payload,
        events.c.created_at,
        span.label("span"),
    )


#: Every form of index, by name: the view's columns -> (key elements, keyword arguments). The
#: view has columns id, kind, amount, tags, payload, created_at and span (an int4range).
INDEX_FORMS: dict[str, Callable[[Any], tuple[list[Any], dict[str, Any]]]] = {
    "desc": lambda c: ([c.amount.desc()], {}),
    "nulls_first": lambda c: ([c.amount.nulls_first()], {}),
    "desc_nulls_last": lambda c: ([c.amount.desc().nulls_last()], {}),
    "ops": lambda c: ([c.kind], {"postgresql_ops": {"kind": "text_pattern_ops"}}),
    "collate": lambda c: ([c.kind.collate("C")], {}),
    "hash": lambda c: ([c.kind], {"postgresql_using": "hash"}),
    "gin": lambda c: ([c.tags], {"postgresql_using": "gin"}),
    "gin_ops": lambda c: (
        [c.payload],
        {"postgresql_using": "gin", "postgresql_ops": {"payload": "jsonb_path_ops"}},
    ),
    "gist": lambda c: ([c.span], {"postgresql_using": "gist"}),
    "brin": lambda c: (
        [c.created_at],
        {"postgresql_using": "brin", "postgresql_with": {"pages_per_range": 16}},
    ),
    "partial": lambda c: ([c.kind], {"postgresql_where": c.amount > 0}),
    "include": lambda c: ([c.amount], {"postgresql_include": ["kind"]}),
    "include_column": lambda c: ([c.created_at], {"postgresql_include": [c.kind, c.amount]}),
    "fillfactor": lambda c: ([c.kind], {"postgresql_with": {"fillfactor": 70}}),
    "expression": lambda c: ([sa.func.lower(c.kind)], {}),
    "arithmetic": lambda c: ([c.amount * 2], {}),
    "mixed": lambda c: (
        [c.kind, sa.func.lower(c.kind).desc(), c.amount.desc().nulls_last(), c.created_at],
        {"postgresql_ops": {"kind": "text_pattern_ops"}},
    ),
    "unique": lambda c: ([c.kind, c.id], {"unique": True}),
    "unique_partial": lambda c: (
        [c.kind],
        {"unique": True, "postgresql_where": sa.and_(c.amount > 10, c.kind != "it's")},
    ),
}


def index_forms(
    view: MaterializedView,
    overrides: dict[str, Callable[[Any], tuple[list[Any], dict[str, Any]]]] | None = None,
) -> list[sa.Index]:
    """An index of every form on ``view``, named ``<view>_<form>``."""
    forms = {**INDEX_FORMS, **(overrides or {})}
    built = []
    for name, form in forms.items():
        expressions, kwargs = form(view.c)
        built.append(sa.Index(f"{view.name}_{name}", *expressions, **kwargs))
    return built


def _distinct_on(query: sa.Select[Any], *expressions: Any) -> sa.Select[Any]:
    # SQLAlchemy 2.1 spells DISTINCT ON as an extension; 2.0 has only .distinct(expr).
    try:
        from sqlalchemy.dialects.postgresql import distinct_on
    except ImportError:
        return query.distinct(*expressions)
    return query.ext(distinct_on(*expressions))
