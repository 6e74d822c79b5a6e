"""Privileges and owners survive a view being dropped and created again.

Roles are cluster-wide: each test creates its own, with unique names, and drops them after.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.util import CommandError
from matview_alembic_helpers import autogenerate, offline_sql, run_code

from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.ops import (
    CreateMaterializedViewOp,
    DropPlainViewOp,
    InvalidGrantError,
)

MakeRole = Callable[[str], str]


@pytest.fixture
def make_role(conn: sa.Connection) -> Iterator[MakeRole]:
    """``make_role("app_reader")`` creates a NOLOGIN role with a unique name and returns it."""
    created: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        quoted = conn.dialect.identifier_preparer.quote(name)
        conn.execute(sa.text(f"CREATE ROLE {quoted} NOLOGIN"))
        created.append(name)
        return name

    yield make
    conn.rollback()
    for name in created:
        if conn.scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}):
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(sa.text(f"DROP OWNED BY {quoted}"))
            conn.execute(sa.text(f"DROP ROLE {quoted}"))
    conn.commit()


def q(conn: sa.Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def can(conn: sa.Connection, role: str, relation: str, privilege: str = "SELECT") -> bool:
    return bool(
        conn.scalar(
            sa.text("SELECT has_table_privilege(:r, :t, :p)"),
            {"r": role, "t": relation, "p": privilege},
        )
    )


def access(conn: sa.Connection) -> dict[str, Any]:
    """Owner and ACL (grantor, grantee, privilege, grantable) of every view in ``public``."""
    rows = conn.execute(
        sa.text(
            """
            SELECT c.relname, pg_get_userbyid(c.relowner) AS owner,
                   ARRAY(SELECT pg_get_userbyid(a.grantor) || ' ' ||
                                CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                     ELSE pg_get_userbyid(a.grantee) END || ' ' ||
                                a.privilege_type || ' ' || a.is_grantable::text
                           FROM aclexplode(c.relacl) a ORDER BY 1) AS acl
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('v', 'm') AND n.nspname = 'public'
             ORDER BY 1
            """
        )
    )
    return {r[0]: (r[1], r[2]) for r in rows}


# -- replace_materialized_view -----------------------------------------------------------------


def test_replace_keeps_grants_and_owners_of_the_view_and_its_dependents(
    conn: sa.Connection, make_role: MakeRole
) -> None:
    reader = make_role("app_reader")
    report = make_role("Report Reader")
    owner = make_role("app_owner")
    for statement in [
        "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int)",
        "INSERT INTO events SELECT g, 'k' || (g % 3), g FROM generate_series(1, 30) g",
        "CREATE MATERIALIZED VIEW base AS"
        " SELECT kind, sum(amount) AS total FROM events GROUP BY kind",
        "CREATE VIEW base_big AS SELECT kind, total FROM base WHERE total > 100",
        "CREATE MATERIALIZED VIEW top_kind AS SELECT kind FROM base_big LIMIT 1",
        f"GRANT SELECT ON base TO {q(conn, reader)}",
        f"GRANT SELECT, REFERENCES ON base TO {q(conn, report)} WITH GRANT OPTION",
        f"GRANT SELECT ON base_big TO {q(conn, reader)}",
        "GRANT SELECT ON top_kind TO PUBLIC",
        f"GRANT ALL ON events TO {q(conn, owner)}",
        f"ALTER MATERIALIZED VIEW top_kind OWNER TO {q(conn, owner)}",
        f"ALTER VIEW base_big OWNER TO {q(conn, owner)}",
        f"GRANT SELECT ON base TO {q(conn, owner)}",
    ]:
        conn.execute(sa.text(statement))
    before = access(conn)
    assert before["top_kind"][0] == owner

    run_code(
        conn,
        "op.replace_materialized_view('base', "
        "'SELECT kind, sum(amount) AS total, count(*) AS n FROM events GROUP BY kind', "
        "old_definition='SELECT kind, sum(amount) AS total FROM events GROUP BY kind')",
    )
    assert conn.scalar(sa.text("SELECT max(n) FROM base")) == 10
    assert access(conn) == before
    for relation in ("base", "base_big"):
        assert can(conn, reader, relation)
    assert can(conn, report, "base")
    assert can(conn, report, "base", "SELECT WITH GRANT OPTION")
    assert not can(conn, report, "base_big")
    assert can(conn, reader, "top_kind")  # through PUBLIC
    # The read-only role can actually read, as itself.
    conn.execute(sa.text(f"SET ROLE {q(conn, reader)}"))
    assert conn.scalar(sa.text("SELECT count(*) FROM base_big")) == 3
    conn.execute(sa.text("RESET ROLE"))


def test_replace_in_offline_mode_needs_what_it_restores() -> None:
    # Without a catalog, a replace that does not carry the view's indexes, privileges and
    # dependents cannot do what it does online: it refuses in one line, before any SQL.
    with pytest.raises(CommandError, match=r"replace_materialized_view\('mv'\).*--sql"):
        offline_sql(
            "op.create_materialized_view('x', 'SELECT 1 AS one')\n"
            "op.replace_materialized_view('mv', 'SELECT 1 AS one')"
        )
    sql = offline_sql(
        "op.replace_materialized_view('mv', 'SELECT 1 AS one', grants=[('app_reader', 'SELECT')],"
        " owner='reporting', dependents=[])"
    )
    assert [s.strip() for s in sql.split(";") if s.strip()] == [
        "DROP MATERIALIZED VIEW mv",
        "CREATE MATERIALIZED VIEW mv AS SELECT 1 AS one WITH DATA",
        "ALTER MATERIALIZED VIEW mv OWNER TO reporting",
        "GRANT SELECT ON mv TO app_reader",
    ]


# -- ops: grants and owner as data --------------------------------------------------------------


def test_grants_render_reverse_and_run_offline() -> None:
    op = CreateMaterializedViewOp(
        "mv",
        "SELECT 1 AS one",
        grants=[("app_reader", "select"), ("Report Reader", "SELECT", True), ("public", "SELECT")],
        owner="Reporting Owner",
    )
    assert op.reverse().grants == op.grants
    assert op.reverse().owner == "Reporting Owner"
    assert op.reverse().reverse().grants == op.grants
    code = (
        "op.create_materialized_view('mv', 'SELECT 1 AS one', grants=["
        "('app_reader', 'SELECT'), ('Report Reader', 'SELECT', True), ('app_reader', 'INSERT'),"
        " ('public', 'SELECT')], owner='Reporting Owner')"
    )
    sql = offline_sql(code)
    assert sql.index('OWNER TO "Reporting Owner"') < sql.index("GRANT")
    assert 'ALTER MATERIALIZED VIEW mv OWNER TO "Reporting Owner";' in sql
    assert "GRANT SELECT, INSERT ON mv TO app_reader;" in sql
    assert 'GRANT SELECT ON mv TO "Report Reader" WITH GRANT OPTION;' in sql
    assert "GRANT SELECT ON mv TO PUBLIC;" in sql

    plain = offline_sql(
        "op.create_plain_view('v', 'SELECT 1 AS one', schema='Other', "
        "grants=[('app_reader', 'SELECT')])"
    )
    assert 'GRANT SELECT ON "Other".v TO app_reader;' in plain
    assert "OWNER" not in plain
    assert DropPlainViewOp("v", definition="SELECT 1", grants=[("r", "SELECT")]).reverse().grants


@pytest.mark.parametrize(
    "grants, message",
    [
        ([("app_reader", "SELECT; DROP TABLE events")], "not a privilege"),
        ([("app_reader", "USAGE")], "not a privilege"),
        ([("app_reader",)], "is not \\(role, privilege\\)"),
        (["app_reader"], "is not \\(role, privilege\\)"),
        ([("", "SELECT")], "is not \\(role, privilege\\)"),
    ],
)
def test_bad_grants_are_refused_before_any_sql(grants: Any, message: str) -> None:
    with pytest.raises(InvalidGrantError, match=f"mv_daily.*{message}"):
        CreateMaterializedViewOp("mv_daily", "SELECT 1", grants=grants)


def test_owner_is_only_changed_when_it_is_another_role(
    conn: sa.Connection, make_role: MakeRole
) -> None:
    owner = make_role("Reporting Owner")
    me = conn.scalar(sa.text("SELECT current_user"))
    run_code(conn, f"op.create_materialized_view('mine', 'SELECT 1 AS one', owner={me!r})")
    run_code(conn, f"op.create_plain_view('theirs', 'SELECT 1 AS one', owner={owner!r})")
    state = access(conn)
    assert state["mine"][0] == me
    assert state["theirs"][0] == owner


# -- autogenerate: views detached around column changes keep their access -------------------------


def _column_schema(*, legacy: bool) -> sa.MetaData:
    md = sa.MetaData()
    columns = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer),
    ]
    if legacy:
        columns.append(sa.Column("legacy", sa.Integer))
    events = sa.Table("events", md, *columns)
    total = events.c.legacy if legacy else events.c.amount
    MaterializedView(
        "mv_totals",
        md,
        sa.select(events.c.kind, sa.func.sum(total).label("total")).group_by(events.c.kind),
        unique_key="kind",
    )
    return md


def test_split_round_trip_keeps_grants_and_owner(conn: sa.Connection, make_role: MakeRole) -> None:
    reader = make_role("app_reader")
    report = make_role("Report Reader")
    owner = make_role("app_owner")
    v1 = _column_schema(legacy=True)
    v1.create_all(conn)
    for statement in [
        "INSERT INTO events SELECT g, 'k' || (g % 3), g, g * 10 FROM generate_series(1, 30) g",
        "REFRESH MATERIALIZED VIEW mv_totals",
        "CREATE VIEW big_totals AS SELECT kind, total FROM mv_totals WHERE total > 100",
        f"GRANT SELECT ON mv_totals TO {q(conn, reader)}",
        f"GRANT SELECT ON mv_totals TO {q(conn, report)} WITH GRANT OPTION",
        f"GRANT SELECT ON big_totals TO {q(conn, reader)}, {q(conn, report)}",
        f"GRANT SELECT ON events TO {q(conn, owner)}",
        f"ALTER MATERIALIZED VIEW mv_totals OWNER TO {q(conn, owner)}",
    ]:
        conn.execute(sa.text(statement))
    before = access(conn)

    generated = autogenerate(conn, _column_schema(legacy=False))
    # The privileges are in the migration, as data, in both directions.
    assert f"owner={owner!r}" in generated.upgrade
    assert f"({report!r}, 'SELECT', True)" in generated.upgrade
    assert f"({reader!r}, 'SELECT')" in generated.upgrade
    assert f"({report!r}, 'SELECT', True)" in generated.downgrade
    assert "op.drop_column('events', 'legacy')" in generated.upgrade

    run_code(conn, generated.upgrade)
    after = access(conn)
    assert after == before
    for role in (reader, report):
        assert can(conn, role, "mv_totals")
        assert can(conn, role, "big_totals")
    assert autogenerate(conn, _column_schema(legacy=False)).empty

    run_code(conn, generated.downgrade)
    assert access(conn) == before
    assert autogenerate(conn, v1).empty
    run_code(conn, generated.upgrade)
    assert access(conn) == after
    assert can(conn, reader, "big_totals")


def test_dropped_view_gets_its_grants_back_on_downgrade(
    conn: sa.Connection, make_role: MakeRole
) -> None:
    reader = make_role("Report Reader")
    conn.execute(sa.text("CREATE TABLE events (id int PRIMARY KEY)"))
    conn.execute(sa.text("CREATE MATERIALIZED VIEW old_mv AS SELECT id FROM events"))
    conn.execute(sa.text(f"GRANT SELECT ON old_mv TO {q(conn, reader)}"))
    md = sa.MetaData()
    sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True))
    generated = autogenerate(conn, md)
    assert f"grants=[({reader!r}, 'SELECT')]" in generated.upgrade
    run_code(conn, generated.upgrade)
    run_code(conn, generated.downgrade)
    assert can(conn, reader, "old_mv")


def test_replace_keeps_grants_on_async_drivers(async_engine: Any) -> None:
    # capture_views reads the ACL as arrays: both async drivers must decode them alike.
    # Nothing is committed: the roles go away with the rollback.
    import asyncio

    reader = f"Report Reader {uuid.uuid4().hex[:8]}"
    owner = f"app_owner_{uuid.uuid4().hex[:8]}"

    def scenario(conn: sa.Connection) -> tuple[Any, Any]:
        for statement in [
            f"CREATE ROLE {q(conn, reader)} NOLOGIN",
            f"CREATE ROLE {q(conn, owner)} NOLOGIN",
            "CREATE TABLE events (id int PRIMARY KEY, kind text)",
            "CREATE MATERIALIZED VIEW base AS SELECT kind, count(*) AS n FROM events GROUP BY 1",
            "CREATE VIEW base_view AS SELECT kind FROM base",
            f"GRANT SELECT ON base TO {q(conn, reader)} WITH GRANT OPTION",
            f"GRANT SELECT, INSERT ON base_view TO {q(conn, reader)}, PUBLIC",
            f"ALTER VIEW base_view OWNER TO {q(conn, owner)}",
        ]:
            conn.execute(sa.text(statement))
        before = access(conn)
        run_code(conn, "op.replace_materialized_view('base', 'SELECT kind FROM events')")
        return before, access(conn)

    async def main() -> tuple[Any, Any]:
        async with async_engine.connect() as conn:
            result: tuple[Any, Any] = await conn.run_sync(scenario)
            await conn.rollback()
            return result

    before, after = asyncio.run(main())
    assert after == before
    assert before["base_view"][0] == owner
    assert any(entry.endswith(" true") for entry in before["base"][1])
