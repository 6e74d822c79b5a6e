"""Change tracking in a shared database, attacked by a real unprivileged role.

Three login roles made for each test: ``app`` (owns the tables and views, runs create_all,
refreshes; no superuser), ``attacker`` (CONNECT, and whatever each test grants it: the
CREATE on ``public`` every role had before PostgreSQL 15, CREATE on the database) and
``writer`` (only INSERT on the source). Every attack plants a trap that, if the app's role
ever ran it, would record ``current_user`` in ``trap_log`` and grant the attacker SELECT on
``secret``, a table it must never read. Each test ends by checking both stayed untouched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import (
    MaterializedView,
    RefreshResult,
    RefreshWorker,
    TrackingInstallError,
    check_tracking,
    refresh_stale,
)
from sqlalchemy_matview.orchestration import tracking

SCHEMA = "sqlalchemy_matview"


@dataclass
class Roles:
    app: str
    attacker: str
    writer: str
    admin: Engine  # superuser, on the test database
    url: sa.URL

    def engine(self, role: str) -> Engine:
        return sa.create_engine(self.url.set(username=role), poolclass=sa.NullPool)

    def psql(self, role: str) -> psycopg.Connection[tuple[object, ...]]:
        url = self.url
        return psycopg.connect(
            host=url.host,
            port=url.port,
            user=role,
            dbname=url.database,
            autocommit=True,
        )


@pytest.fixture
def roles(engine: Engine, pg_url: sa.URL) -> Iterator[Roles]:
    tag = uuid.uuid4().hex[:8]
    r = Roles(f"mv_app_{tag}", f"mv_attacker_{tag}", f"mv_writer_{tag}", engine, pg_url)
    db = engine.dialect.identifier_preparer.quote(str(pg_url.database))
    with engine.begin() as conn:
        for role in (r.app, r.attacker, r.writer):
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN NOSUPERUSER"))
        conn.execute(sa.text(f"GRANT CREATE ON DATABASE {db} TO {r.app}"))
        conn.execute(sa.text(f"GRANT CREATE ON SCHEMA public TO {r.app}"))
        # The trap's evidence: anyone may append to it, only the superuser reads it.
        conn.execute(sa.text("CREATE TABLE public.trap_log (who text, what text)"))
        conn.execute(sa.text("GRANT INSERT ON public.trap_log TO PUBLIC"))
        conn.execute(sa.text("CREATE TABLE public.secret (x int)"))
        conn.execute(sa.text(f"ALTER TABLE public.secret OWNER TO {r.app}"))
    try:
        yield r
    finally:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usename = ANY(:roles)"
                ),
                {"roles": [r.app, r.attacker, r.writer]},
            )
            for role in (r.app, r.attacker, r.writer):
                conn.execute(sa.text(f"DROP OWNED BY {role} CASCADE"))
                conn.execute(sa.text(f"DROP ROLE {role}"))


def _trap_body(roles: Roles, what: str) -> str:
    """PL/pgSQL statements that record who ran them and try to escalate."""
    return (
        f" INSERT INTO public.trap_log VALUES (current_user, '{what}');"
        f" BEGIN EXECUTE 'GRANT SELECT ON public.secret TO {roles.attacker}';"
        " EXCEPTION WHEN OTHERS THEN NULL; END;"
    )


def _assert_untouched(roles: Roles) -> None:
    with roles.admin.connect() as conn:
        # The attacker running its own trap (setting it up) proves nothing.
        log = conn.execute(
            sa.text("SELECT who, what FROM public.trap_log WHERE who <> :r"),
            {"r": roles.attacker},
        ).all()
        granted = conn.scalar(
            sa.text("SELECT has_table_privilege(:r, 'public.secret', 'SELECT')"),
            {"r": roles.attacker},
        )
    assert log == [], f"the attacker's code ran: {log}"
    assert granted is False


def _declare() -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData()
    src = sa.Table(
        "src",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Integer),
    )
    mv = MaterializedView(
        "mv_sum",
        md,
        sa.select(sa.func.count().label("n")).select_from(src),
        columns=[sa.Column("n", sa.BigInteger)],
        track_changes=True,
    )
    return md, src, mv


def _statuses(engine: Engine, md: sa.MetaData) -> dict[str, str]:
    return {r.view: r.status for r in refresh_stale(engine, md)}


def test_squatted_bookkeeping_schema_is_refused(roles: Roles) -> None:
    db = roles.admin.dialect.identifier_preparer.quote(str(roles.url.database))
    with roles.admin.begin() as conn:
        conn.execute(sa.text(f"GRANT CREATE ON DATABASE {db} TO {roles.attacker}"))
    with roles.psql(roles.attacker) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"GRANT ALL ON SCHEMA {SCHEMA} TO PUBLIC")
        conn.execute(
            f"CREATE FUNCTION {SCHEMA}.mark_stale() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {_trap_body(roles, 'mark_stale')} RETURN NULL; END $$"
        )
        conn.execute(f"GRANT EXECUTE ON FUNCTION {SCHEMA}.mark_stale() TO PUBLIC")
    md, _, _ = _declare()
    app = roles.engine(roles.app)
    try:
        with pytest.raises(TrackingInstallError) as info:
            md.create_all(app)
    finally:
        app.dispose()
    assert SCHEMA in str(info.value) and roles.attacker in str(info.value)
    _assert_untouched(roles)


# What a role given CREATE on the bookkeeping schema (by a careless admin) may put there:
# (create, drop). The function is an overload of the record() every refresh calls.
_RECORD_OVERLOAD = "record(varchar, varchar, timestamptz, float8, varchar, boolean, varchar)"
_PLANTED = {
    "function": (
        f"CREATE FUNCTION {SCHEMA}.{_RECORD_OVERLOAD} RETURNS void LANGUAGE plpgsql"
        " AS $$ BEGIN {trap} END $$",
        f"DROP FUNCTION {SCHEMA}.{_RECORD_OVERLOAD}",
    ),
    "table": (f"CREATE TABLE {SCHEMA}.planted (x int)", f"DROP TABLE {SCHEMA}.planted"),
    "domain": (
        f"CREATE DOMAIN {SCHEMA}.planted AS int CHECK (VALUE > 0)",
        f"DROP DOMAIN {SCHEMA}.planted",
    ),
}


@pytest.mark.parametrize("kind", sorted(_PLANTED))
def test_an_object_planted_in_the_bookkeeping_schema_stops_refreshes(
    roles: Roles, kind: str
) -> None:
    """The bookkeeping belongs to the app, but another role created something in it: an
    incremental view's refresh refuses (its refresh function is not trusted then) until the
    object is gone, and none of its code runs. The plan finds the schema's objects through
    their pg_depend entries: this pins that a function, a table and a type are all seen."""
    from sqlalchemy_matview import Incremental, UnknownViewError, refresh_views

    md = sa.MetaData()
    src = sa.Table(
        "src", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Integer)
    )
    mv = MaterializedView(
        "mv_inc",
        md,
        sa.select(src.c.id, sa.func.sum(src.c.v).label("v")).group_by(src.c.id),
        incremental=Incremental(key="id", sources={src: src.c.id}),
    )
    create, drop = _PLANTED[kind]
    app = roles.engine(roles.app)
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 1, "v": 1}])
        with roles.admin.begin() as conn:
            conn.execute(sa.text(f"GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO {roles.attacker}"))
        with roles.psql(roles.attacker) as conn:
            conn.execute(create.replace("{trap}", _trap_body(roles, kind)))
        with app.connect() as conn:
            assert not tracking.bookkeeping_inventory(conn).exists
        with pytest.raises(UnknownViewError, match="mv_inc"):
            refresh_views(app, mv)
        with roles.psql(roles.attacker) as conn:
            conn.execute(drop)
        [done] = refresh_views(app, mv)
        assert (done.status, done.buckets) == ("refreshed", 1)
    finally:
        app.dispose()
    _assert_untouched(roles)


def test_the_inventory_sees_every_kind_of_object_in_the_schema(engine: Engine) -> None:
    """The inventory lists the schema's objects from pg_depend (an index scan), not by
    scanning pg_class and pg_proc: every kind a role can create there is listed, as the
    scans list it (indexes aside: they belong to their table's owner; a composite type's
    relation is listed as the type, whose owner it shares)."""
    schema = "inventory_kinds"
    with engine.begin() as conn:
        for statement in (
            f"CREATE SCHEMA {schema}",
            f"CREATE TABLE {schema}.t (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int)",
            f"CREATE TABLE {schema}.p (d date) PARTITION BY RANGE (d)",
            f"CREATE TABLE {schema}.p1 PARTITION OF {schema}.p FOR VALUES FROM ('2026-01-01')"
            " TO ('2027-01-01')",
            f"CREATE UNLOGGED TABLE {schema}.u (x serial)",
            f"CREATE SEQUENCE {schema}.s",
            f"CREATE VIEW {schema}.v AS SELECT 1 AS x",
            f"CREATE MATERIALIZED VIEW {schema}.m AS SELECT 1 AS x",
            f"CREATE TYPE {schema}.c AS (a int)",
            f"CREATE TYPE {schema}.e AS ENUM ('a')",
            f"CREATE DOMAIN {schema}.d AS int",
            f"CREATE FUNCTION {schema}.f(int) RETURNS int LANGUAGE sql AS 'SELECT $1'",
            f"CREATE PROCEDURE {schema}.pr() LANGUAGE sql AS 'SELECT 1'",
            f"CREATE AGGREGATE {schema}.ag(int) (SFUNC = int4pl, STYPE = int)",
            "CREATE TABLE public.moved (x int)",
            f"ALTER TABLE public.moved SET SCHEMA {schema}",
        ):
            conn.execute(sa.text(statement))
        listed = {
            (r.kind, r.name)
            for r in conn.execute(tracking._INVENTORY, {"schema": schema})
            if r.kind != "schema"
        }
        scanned = conn.execute(
            sa.text(
                "SELECT CASE c.relkind WHEN 'c' THEN 'type' ELSE 'relation' END,"
                " n.nspname || '.' || c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = :s AND c.relkind NOT IN ('i', 'I')"
                " UNION ALL SELECT 'function', n.nspname || '.' || p.proname FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s"
            ),
            {"s": schema},
        ).all()
    assert {tuple(r) for r in scanned} <= listed
    assert {n for k, n in listed if k == "type"} >= {f"{schema}.{t}" for t in ("c", "e", "d")}
    assert len(scanned) >= 14


def test_squatted_tables_of_0_1_0_in_public_are_refused(roles: Roles) -> None:
    """Before PostgreSQL 15 every role could CREATE in public (upgraded databases still can)."""
    with roles.admin.begin() as conn:
        conn.execute(sa.text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    with roles.psql(roles.attacker) as conn:
        conn.execute(
            "CREATE TABLE public.sqlalchemy_matview_state (id serial PRIMARY KEY,"
            " view_schema text, view_name text, tracked boolean DEFAULT true,"
            " source_oids oid[] DEFAULT '{}', refreshed_version bigint DEFAULT 0,"
            " last_refreshed_at timestamptz, last_duration float8,"
            " last_concurrently boolean, refresh_count bigint DEFAULT 0,"
            " UNIQUE (view_schema, view_name))"
        )
        conn.execute(
            "CREATE TABLE public.sqlalchemy_matview_changes (view_id int, txid bigint,"
            " id bigserial, changed_at timestamptz DEFAULT now(), PRIMARY KEY (view_id, txid))"
        )
        conn.execute(
            "CREATE FUNCTION public.trap() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {_trap_body(roles, 'legacy table trigger')} RETURN NULL; END $$"
        )
        for table in ("sqlalchemy_matview_state", "sqlalchemy_matview_changes"):
            conn.execute(f"GRANT ALL ON public.{table} TO PUBLIC")
            conn.execute(
                f"CREATE TRIGGER trap AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
                f" ON public.{table} FOR EACH STATEMENT EXECUTE FUNCTION public.trap()"
            )
        conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC")
        conn.execute(
            "INSERT INTO public.sqlalchemy_matview_state (view_schema, view_name)"
            " VALUES ('public', 'mv_sum')"
        )
    md, _, _ = _declare()
    app = roles.engine(roles.app)
    try:
        with pytest.raises(TrackingInstallError) as info:
            md.create_all(app)
    finally:
        app.dispose()
    assert "sqlalchemy_matview_state" in str(info.value) and roles.attacker in str(info.value)
    _assert_untouched(roles)


# Functions whose unqualified name the library's SQL could resolve, each with signatures
# that beat pg_catalog's polymorphic ones (an exact match wins over anyarray).
_HIJACKS = [
    ("unnest", "oid[]", "SETOF oid"),
    ("unnest", "regclass[]", "SETOF regclass"),
    ("unnest", "text[]", "SETOF text"),
    ("unnest", "bigint[]", "SETOF bigint"),
    ("quote_ident", "name", "text"),
    ("pg_notify", "text, name", "void"),
    ("to_regclass", "name", "regclass"),
]


def test_function_hijacks_in_public_never_run(roles: Roles) -> None:
    with roles.admin.begin() as conn:
        conn.execute(sa.text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    with roles.psql(roles.attacker) as conn:
        for name, args, returns in _HIJACKS:
            if returns.startswith("SETOF"):
                result = "RETURN QUERY SELECT pg_catalog.unnest($1);"
            elif returns == "void":
                result = "RETURN;"
            else:
                result = "RETURN NULL;"
            conn.execute(
                f"CREATE FUNCTION public.{name}({args}) RETURNS {returns}"
                f" LANGUAGE plpgsql AS $$ BEGIN {_trap_body(roles, name + '(' + args + ')')}"
                f" {result} END $$"
            )
    md, src, _ = _declare()
    app = roles.engine(roles.app)
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 1, "v": 1}])
        with app.connect() as conn:
            states = tracking.view_states(conn)
        assert states[("public", "mv_sum")].stale
        assert _statuses(app, md)["public.mv_sum"] == "refreshed"
        assert _statuses(app, md)["public.mv_sum"] == "skipped_fresh"
        md.drop_all(app)
        md.create_all(app)
    finally:
        app.dispose()
    _assert_untouched(roles)


def test_library_functions_and_tables_refuse_other_roles(roles: Roles) -> None:
    md, _, _ = _declare()
    app = roles.engine(roles.app)
    try:
        md.create_all(app)
    finally:
        app.dispose()
    with roles.admin.connect() as conn:
        functions = (
            conn.execute(
                sa.text(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p"
                    " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s"
                ),
                {"s": SCHEMA},
            )
            .scalars()
            .all()
        )
        tables = (
            conn.execute(
                sa.text(
                    "SELECT c.oid::regclass::text FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = :s AND c.relkind IN ('r', 'p')"
                ),
                {"s": SCHEMA},
            )
            .scalars()
            .all()
        )
        acl = (
            conn.execute(
                sa.text(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p"
                    " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s"
                    " AND has_function_privilege(:r, p.oid, 'EXECUTE')"
                ),
                {"s": SCHEMA, "r": roles.attacker},
            )
            .scalars()
            .all()
        )
    assert functions and tables
    assert acl == [], "EXECUTE is granted to PUBLIC"
    # Even with USAGE on the schema (granted by a careless admin), nothing is callable.
    with roles.admin.begin() as conn:
        conn.execute(sa.text(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {roles.attacker}"))
    calls = {
        "refresh": f"SELECT {SCHEMA}.refresh('public', 'mv_sum', 0, false, 'none', false)",
        "track": f"SELECT {SCHEMA}.track('public', 'mv_sum', ARRAY['public.trap_log']::regclass[])",
        "untrack": f"SELECT {SCHEMA}.untrack('public', 'mv_sum')",
        "sync_triggers": f"SELECT {SCHEMA}.sync_triggers()",
    }
    with roles.psql(roles.attacker) as conn:
        conn.execute("CREATE TEMP TABLE mine (x int)")
        for call in calls.values():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(call)
        # A trigger of its own with forged arguments (view id, barrier, payload).
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "CREATE TRIGGER forged AFTER INSERT ON mine FOR EACH STATEMENT"
                f" EXECUTE FUNCTION {SCHEMA}.mark_stale('1', '1', 'public.mv_sum')"
            )
        for table in tables:
            for statement in (f"SELECT * FROM {table}", f"DELETE FROM {table}"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    _assert_untouched(roles)


def test_a_writer_with_only_insert_marks_the_view_stale(roles: Roles) -> None:
    md, src, _ = _declare()
    app = roles.engine(roles.app)
    writer = roles.engine(roles.writer)
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(sa.text(f"GRANT INSERT, TRUNCATE ON src TO {roles.writer}"))
        for statement in ("INSERT INTO src VALUES (1, 1)", "TRUNCATE src"):
            with writer.begin() as conn:
                conn.execute(sa.text(statement))
            assert _statuses(app, md)["public.mv_sum"] == "refreshed", statement
        with writer.connect() as conn, pytest.raises(sa.exc.ProgrammingError):
            conn.execute(sa.select(src))  # it really has nothing else
    finally:
        app.dispose()
        writer.dispose()
    _assert_untouched(roles)


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.02)


def test_forged_notifications_raise_no_privilege(roles: Roles) -> None:
    md, src, mv = _declare()
    app = roles.engine(roles.app)
    results: list[RefreshResult] = []
    worker = RefreshWorker(app, md, debounce=0.05, on_result=results.append)
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 1, "v": 1}])
        with roles.admin.begin() as conn:
            conn.execute(sa.text(f"GRANT CREATE ON SCHEMA public TO {roles.attacker}"))
        with roles.psql(roles.attacker) as raw:
            # A view of its own whose refresh would run the trap as the refresher.
            raw.execute(
                "CREATE FUNCTION public.evil() RETURNS int LANGUAGE plpgsql AS $$"
                f" BEGIN {_trap_body(roles, 'evil view refreshed')} RETURN 1; END $$"
            )
            raw.execute(
                "CREATE MATERIALIZED VIEW public.mv_evil AS SELECT public.evil() AS x WITH NO DATA"
            )
        worker.start()
        _wait_for(
            lambda: ("public.mv_sum", "refreshed") in [(r.view, r.status) for r in results],
            "the worker's catch-up pass did not refresh the stale view",
        )
        before = len(results)
        with roles.psql(roles.attacker) as raw:
            for payload in (
                "public.mv_evil",
                'public.mv_sum"; GRANT SELECT ON public.secret TO PUBLIC; --',
                "public.mv_sum'; GRANT SELECT ON public.secret TO PUBLIC; --",
                "public.secret",
                "x" * 7000,
                "public.mv_sum",  # a real one: the worker may refresh it, as app would anyway
            ):
                raw.execute("SELECT pg_notify('sqlalchemy_matview', %s)", (payload,))
        # Queued after the forged ones (notifications arrive in commit order).
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 2, "v": 2}])

        def refreshed_to_two() -> bool:
            with app.connect() as conn:
                return len(results) > before and conn.scalar(sa.select(mv.c.n)) == 2

        _wait_for(refreshed_to_two, "the worker did not refresh after the real write")
        assert {r.view for r in results} == {"public.mv_sum"}
        assert worker.running
    finally:
        worker.stop(timeout=30)
        app.dispose()
    _assert_untouched(roles)


def test_another_role_cannot_stall_refreshes(roles: Roles) -> None:
    """Advisory lock keys another role can read in the trigger definitions stall nothing.

    (A role watching pg_locks while a writer holds the barrier can still learn it and delay
    refreshes up to their timeout: a documented limit, see docs/change-tracking.md.)
    """
    md, src, mv = _declare()
    app = roles.engine(roles.app)
    try:
        md.create_all(app)
        with roles.psql(roles.attacker) as attacker:
            args = attacker.execute(
                "SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE NOT tgisinternal"
            ).fetchall()
            keys = {
                int(a)
                for (raw,) in args
                for a in str(raw).split("\\000")
                if a.lstrip("-").isdigit()
            }
            for key in keys:
                attacker.execute("SELECT pg_advisory_lock(%s)", (key,))
            with app.begin() as conn:
                conn.execute(src.insert(), [{"id": 1, "v": 1}])
            started = time.monotonic()
            assert _statuses(app, md)["public.mv_sum"] in (
                "refreshed",
                "refreshed_pending",
            )
            assert time.monotonic() - started < 10, "a refresh waited on the attacker's lock"
        assert _statuses(app, md)["public.mv_sum"] == "skipped_fresh"
        with app.connect() as conn:
            assert conn.scalar(sa.select(mv.c.n)) == 1
    finally:
        app.dispose()
    _assert_untouched(roles)


def test_a_writer_cannot_opt_out_of_marking(roles: Roles) -> None:
    """Tracking is not advisory: a writer's session settings cannot skip the mark.

    Row-level firings (partitioned sources, replication apply) still take the shortcut: a
    documented limit (docs/change-tracking.md), so only a plain table is pinned here.
    """
    md, _, _ = _declare()
    app = roles.engine(roles.app)
    writer = roles.engine(roles.writer)
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(sa.text(f"GRANT INSERT ON src TO {roles.writer}"))
        assert _statuses(app, md)["public.mv_sum"] == "skipped_fresh"
        with writer.begin() as conn:
            # What the trigger function records once it has marked, forged in advance.
            conn.execute(
                sa.text(
                    "SELECT set_config('sqlalchemy_matview.marked',"
                    " pg_current_xact_id()::text || ':' || 'src'::regclass::oid::text, true)"
                )
            )
            conn.execute(sa.text("INSERT INTO src VALUES (1, 1)"))
        assert _statuses(app, md)["public.mv_sum"] == "refreshed"
        # The view's flag, which spares writers the trigger function while a committed mark
        # stands for their change: a writer may read it, not raise it.
        with app.connect() as conn:
            flag = conn.scalar(
                sa.text(
                    "SELECT 'sqlalchemy_matview.stale_' || v.id FROM sqlalchemy_matview.views v"
                    " WHERE v.view_name = 'mv_sum'"
                )
            )
        for attempt in (
            "SELECT setval(CAST(:f AS regclass), CAST(:f AS regclass)::oid::int8)",
            "SELECT nextval(CAST(:f AS regclass))",
            f"ALTER SEQUENCE {flag} RESTART",
        ):
            with writer.connect() as conn, pytest.raises(sa.exc.ProgrammingError):
                conn.execute(sa.text(attempt), {"f": flag})
        with writer.begin() as conn:
            conn.execute(sa.text("INSERT INTO src VALUES (2, 1)"))
        assert _statuses(app, md)["public.mv_sum"] == "refreshed"
    finally:
        app.dispose()
        writer.dispose()
    _assert_untouched(roles)


# Operators pg_catalog has no exact version of (it compares these through a coercion or a
# polymorphic operator): one created in public with the exact argument types wins even with
# pg_catalog first in the search path, as functions do.
_OPERATOR_HIJACKS = [
    ("=", "oid", "regclass", "boolean"),
    ("=", "regclass", "oid", "boolean"),
    ("=", "regclass", "regclass", "boolean"),
    ("<>", "regclass", "regclass", "boolean"),
    ("=", "oid[]", "oid[]", "boolean"),
    ("=", "regclass[]", "regclass[]", "boolean"),
    ("=", "text[]", "text[]", "boolean"),
    ("=", "regproc", "regproc", "boolean"),
    ("=", "regprocedure", "oid", "boolean"),
    ("=", "oid", "regprocedure", "boolean"),
    ("=", "regnamespace", "oid", "boolean"),
    ("=", "oid", "regnamespace", "boolean"),
    ("=", "regrole", "oid", "boolean"),
    ("=", "oid", "regrole", "boolean"),
    ("=", "xid8", "bigint", "boolean"),
    ("=", "bigint", "xid8", "boolean"),
]


def test_operator_hijacks_in_public_never_run(roles: Roles) -> None:
    with roles.admin.begin() as conn:
        conn.execute(sa.text("GRANT CREATE ON SCHEMA public TO PUBLIC"))
    with roles.psql(roles.attacker) as raw:
        for i, (op, left, right, _) in enumerate(_OPERATOR_HIJACKS):
            base = {
                "regclass": "oid",
                "regproc": "oid",
                "regprocedure": "oid",
                "regnamespace": "oid",
                "regrole": "oid",
                "xid8": "text",
            }
            cast_l = f"$1::{base[left]}" if left in base else "$1"
            cast_r = f"$2::{base[right]}" if right in base else "$2"
            if "xid8" in (left, right):
                cast_l, cast_r = "$1::text", "$2::text"
            # Springs once per session and operator: a catalog join calls it per row.
            raw.execute(
                f"CREATE FUNCTION public.hijack_{i}(a {left}, b {right}) RETURNS boolean"
                " LANGUAGE plpgsql SET search_path = pg_catalog AS $$ BEGIN"
                f" IF current_setting('trap.op{i}', true) IS DISTINCT FROM 'x' THEN"
                f" PERFORM set_config('trap.op{i}', 'x', false);"
                f" {_trap_body(roles, op + ' ' + left + ',' + right)} END IF;"
                f" RETURN {cast_l} OPERATOR(pg_catalog.{op}) {cast_r}; END $$"
            )
            raw.execute(
                f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right},"
                f" FUNCTION = public.hijack_{i})"
            )
    md, src, _ = _declare()
    app = sa.create_engine(
        roles.url.set(username=roles.app),
        poolclass=sa.NullPool,
        connect_args={"options": "-c statement_timeout=30s"},
    )
    try:
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(src.insert(), [{"id": 1, "v": 1}])
        with app.connect() as conn:
            assert tracking.view_states(conn)[("public", "mv_sum")].stale
        assert check_tracking(app, md) == []
        assert _statuses(app, md)["public.mv_sum"] == "refreshed"
        assert _statuses(app, md)["public.mv_sum"] == "skipped_fresh"
        md.drop_all(app)
        md.create_all(app)
    finally:
        app.dispose()


def test_a_squatted_incremental_refresh_function_never_runs(roles: Roles) -> None:
    """An incremental view is found by its refresh function in the bookkeeping schema: one
    that a squatter created there (with the exact signature) is never called."""
    from sqlalchemy_matview import UnknownViewError, refresh_views
    from sqlalchemy_matview.incremental import names_for
    from sqlalchemy_matview.orchestration.incremental import REFRESH_ARGS

    db = roles.admin.dialect.identifier_preparer.quote(str(roles.url.database))
    with roles.admin.begin() as conn:
        conn.execute(sa.text(f"GRANT CREATE ON DATABASE {db} TO {roles.attacker}"))
    function = names_for("public", "mv_daily").refresh
    params = [f"p{i} {t.strip()}" for i, t in enumerate(REFRESH_ARGS.split(","))] + [
        "OUT status text",
        "OUT buckets bigint",
        "OUT full_refresh boolean",
    ]
    with roles.psql(roles.attacker) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO PUBLIC")
        conn.execute(
            f"CREATE FUNCTION {SCHEMA}.{function}({', '.join(params)}) LANGUAGE plpgsql AS $$"
            f" BEGIN {_trap_body(roles, 'incremental refresh')}"
            " status := 'refreshed'; buckets := 0; full_refresh := false; END $$"
        )
        conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {SCHEMA} TO PUBLIC")
    app = roles.engine(roles.app)
    try:
        with pytest.raises(UnknownViewError, match="mv_daily"):
            refresh_views(app, "public.mv_daily")
    finally:
        app.dispose()
    _assert_untouched(roles)


# What mark_stale, the triggers' SECURITY DEFINER hot path, calls with the writer's own
# search_path (it has no SET clause: one costs as much as the rest of it). Each would win
# over pg_catalog's for an unqualified call: an exact match, or pg_catalog listed after.
_HOT_PATH_HIJACKS = [
    ("pg_sequence_last_value", "regclass", "bigint"),
    ("pg_try_advisory_xact_lock_shared", "bigint", "boolean"),
    ("hashint4extended", "integer, bigint", "bigint"),
    ("current_setting", "text, boolean", "text"),
    ("concat", "text, text", "text"),
    ("concat", "bigint, text, text, text, bigint", "text"),
    ("md5", "text", "text"),
    ("set_config", "text, text, boolean", "text"),
    ("pg_current_xact_id", "", "xid8"),
]
_HOT_PATH_OPERATORS = [
    ("=", "text", "boolean"),
    ("||", "text", "text"),
    ("+", "integer", "integer"),
    ("<", "integer", "boolean"),
    (">", "integer", "boolean"),
]


def test_a_writers_search_path_and_temp_types_never_reach_the_hot_path(roles: Roles) -> None:
    """A writer with only INSERT puts public (full of the attacker's functions and
    operators) before pg_catalog and shadows types in pg_temp: its writes still mark the
    view stale, through the slow path and the token, and none of that code runs."""
    with roles.admin.begin() as conn:
        conn.execute(sa.text(f"GRANT CREATE ON SCHEMA public TO {roles.attacker}"))
    with roles.psql(roles.attacker) as conn:
        for name, args, returns in _HOT_PATH_HIJACKS:
            params = ", ".join(f"${i + 1}" for i in range(args.count(",") + 1) if args)
            conn.execute(
                f"CREATE FUNCTION public.{name}({args}) RETURNS {returns} LANGUAGE plpgsql"
                f" AS $$ BEGIN {_trap_body(roles, name)}"
                f" RETURN pg_catalog.{name}({params}); END $$"
            )
            conn.execute(f"GRANT EXECUTE ON FUNCTION public.{name}({args}) TO PUBLIC")
        for i, (op, type_, returns) in enumerate(_HOT_PATH_OPERATORS):
            conn.execute(
                f"CREATE FUNCTION public.op_{i}(a {type_}, b {type_})"
                f" RETURNS {returns} LANGUAGE plpgsql"
                f" AS $$ BEGIN {_trap_body(roles, op)}"
                f" RETURN a OPERATOR(pg_catalog.{op}) b; END $$"
            )
            conn.execute(
                f"CREATE OPERATOR public.{op} (LEFTARG = {type_}, RIGHTARG = {type_},"
                f" FUNCTION = public.op_{i})"
            )
    md, _, _ = _declare()
    # A partitioned source too: its row-level triggers take the same hot path.
    parted = sa.Table("psrc", md, sa.Column("id", sa.Integer), postgresql_partition_by="RANGE (id)")
    MaterializedView(
        "mv_parted",
        md,
        sa.select(sa.func.count().label("n")).select_from(parted),
        columns=[sa.Column("n", sa.BigInteger)],
        track_changes=True,
    )
    app = roles.engine(roles.app)
    try:
        with app.begin() as conn:
            md.create_all(conn, tables=[parted])
            conn.execute(
                sa.text("CREATE TABLE psrc_1 PARTITION OF psrc FOR VALUES FROM (0) TO (99)")
            )
        md.create_all(app)
        with app.begin() as conn:
            conn.execute(sa.text(f"GRANT INSERT ON src, psrc TO {roles.writer}"))
        with roles.psql(roles.writer) as writer:
            writer.execute("SET search_path = public, pg_catalog")
            for type_ in ("int4", "int8", "text", "regclass", "bool"):
                writer.execute(f'CREATE TEMP TABLE "{type_}" (x int)')
            for key in range(1, 4):  # fresh -> stale, then the token twice
                writer.execute(f"INSERT INTO src VALUES ({key}, 1)")
                writer.execute(f"INSERT INTO psrc VALUES ({key})")
                if key == 1:
                    assert set(_statuses(app, md).values()) == {"refreshed"}
            assert set(_statuses(app, md).values()) == {"refreshed"}
            writer.execute("INSERT INTO src VALUES (4, 1)")  # the token is void now
            writer.execute("INSERT INTO psrc VALUES (4)")
            assert set(_statuses(app, md).values()) == {"refreshed"}
            assert set(_statuses(app, md).values()) == {"skipped_fresh"}
    finally:
        app.dispose()
    _assert_untouched(roles)
