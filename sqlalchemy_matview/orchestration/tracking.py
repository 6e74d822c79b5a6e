"""Durable change tracking: statement-level triggers, a change log, and per-view state.

Two small tables in schema ``public``, created on first use (never part of your
``MetaData``):

``sqlalchemy_matview_state`` (:data:`STATE_TABLE`)
    one row per view: whether it is tracked, the oids of the tables it is tracked on,
    and the history of its last refresh (when, how long, how, how many times).
``sqlalchemy_matview_changes`` (:data:`CHANGES_TABLE`)
    one row per (view, writing transaction): the durable "this view is stale" mark.

A statement-level trigger on each source table runs
``public.sqlalchemy_matview_mark_stale()``, which looks the table up by oid in the state
table (view names are data, never code), adds a change row for every view tracking it and
calls ``pg_notify('sqlalchemy_matview', '<schema>.<view>')``.

Every refresh made through this library, and every pg_cron job of
:func:`~sqlalchemy_matview.schedule_refresh`, runs ``public.sqlalchemy_matview_refresh()``
(:data:`REFRESH_FUNCTION`, see :func:`refresh_call`): it takes the view's advisory lock,
refreshes, clears the changes covered, records the refresh and marks dependents stale, in
the caller's transaction.

Why a change log and not a boolean or a counter on the state row: a counter needs an
``UPDATE`` of one row per write, so every writing transaction on a tracked table would hold
that row's lock until it commits, and concurrent writers would queue behind each other. An
``INSERT ... ON CONFLICT DO NOTHING`` keyed by the writer's transaction id never waits on
another writer. A refresh clears exactly the change rows its own snapshot could see
(``pg_visible_in_snapshot``), so a write committed while the refresh ran keeps the
view stale: no change is ever lost. The change rows' ids are the view's *version*.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.compiler import IdentifierPreparer

from ..errors import MaterializedViewError
from ..schema import MaterializedView
from ._sql import PreparedDDL
from .locking import lock_key

__all__ = [
    "CHANGES_TABLE",
    "CHANNEL",
    "REFRESH_FUNCTION",
    "STATE_SCHEMA",
    "STATE_TABLE",
    "TRIGGER_FUNCTION",
    "TRIGGER_NAME",
    "TrackingError",
    "ViewState",
    "attach",
    "ensure_state_tables",
    "install_tracking",
    "is_lock_wait_timeout",
    "refresh_and_record",
    "refresh_call",
    "stale_views",
    "state_tables_exist",
    "tracking_installed",
    "uninstall_tracking",
    "view_states",
]

log = logging.getLogger("sqlalchemy_matview")

#: Schema holding the bookkeeping tables and the trigger function.
STATE_SCHEMA = "public"
#: Per-view state: tracking, sources, last refresh.
STATE_TABLE = "sqlalchemy_matview_state"
#: The change log: one row per (view, writing transaction) not yet covered by a refresh.
CHANGES_TABLE = "sqlalchemy_matview_changes"
#: The trigger function every tracked table's trigger runs.
TRIGGER_FUNCTION = "sqlalchemy_matview_mark_stale"
#: Name of the (single, shared) trigger on each tracked table.
TRIGGER_NAME = "sqlalchemy_matview_track"
#: The ``NOTIFY`` channel; the payload is the view's ``schema.name``.
CHANNEL = "sqlalchemy_matview"
#: The function refreshing one view and recording it (see :func:`refresh_call`).
REFRESH_FUNCTION = "sqlalchemy_matview_refresh"
#: Starts the message of a refresh that timed out waiting for another refresher's lock.
ADVISORY_TIMEOUT_MARK = "lock timeout waiting for the refresh lock of"

# The refresh function's argument types, as to_regprocedure() wants them.
_REFRESH_ARGS = "text, text, bigint, boolean, text, boolean"

# Serialises creation of the bookkeeping objects among concurrent create_all() calls:
# CREATE TABLE IF NOT EXISTS alone can still fail on the pg_type unique index.
_SETUP_LOCK_KEY = 0x73716C6D76737431  # "sqlmvst1"


class TrackingError(MaterializedViewError, RuntimeError):
    """Change tracking could not be installed (e.g. a source table does not exist)."""


@dataclass(frozen=True)
class ViewState:
    """What the state table says about one view (see :func:`view_states`)."""

    schema: str
    name: str
    #: Triggers are installed on its sources (``track_changes=True``).
    tracked: bool
    #: Changes were committed that no refresh has covered yet.
    stale: bool
    #: When the oldest uncovered change was made (``None`` when fresh).
    stale_since: datetime | None
    #: Number of (transaction) changes not covered yet.
    pending_changes: int
    #: Highest change id recorded for the view (grows with every writing transaction).
    version: int
    #: Highest change id covered by a refresh; ``stale`` is ``version > refreshed_version``
    #: in spirit, though the exact test is "uncovered change rows exist".
    refreshed_version: int
    last_refreshed_at: datetime | None
    #: Seconds the last refresh took.
    last_duration: float | None
    last_concurrently: bool | None
    refresh_count: int
    #: ``schema.name`` of the tables whose triggers mark it stale.
    sources: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


# -- bookkeeping objects ----------------------------------------------------------------


def _q(preparer: IdentifierPreparer, *names: str) -> str:
    return ".".join(preparer.quote(n) for n in names)


def _setup_statements(preparer: IdentifierPreparer) -> list[str]:
    state = _q(preparer, STATE_SCHEMA, STATE_TABLE)
    changes = _q(preparer, STATE_SCHEMA, CHANGES_TABLE)
    func = _q(preparer, STATE_SCHEMA, TRIGGER_FUNCTION)
    return [
        f"CREATE TABLE IF NOT EXISTS {state} ("
        " id serial PRIMARY KEY,"
        " view_schema text NOT NULL,"
        " view_name text NOT NULL,"
        " tracked boolean NOT NULL DEFAULT false,"
        " source_oids oid[] NOT NULL DEFAULT '{}',"
        " refreshed_version bigint NOT NULL DEFAULT 0,"
        " last_refreshed_at timestamptz,"
        " last_duration double precision,"
        " last_concurrently boolean,"
        " refresh_count bigint NOT NULL DEFAULT 0,"
        " UNIQUE (view_schema, view_name))",
        f"CREATE TABLE IF NOT EXISTS {changes} ("
        " view_id integer NOT NULL,"
        # bigint rather than xid8: tools that reflect every table (Alembic autogenerate)
        # know bigint; a 64-bit transaction id fits, and is cast back to xid8 when compared.
        " txid bigint NOT NULL,"
        " id bigserial NOT NULL,"
        " changed_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (view_id, txid))",
        # SECURITY DEFINER: any role allowed to write a source table may mark views stale
        # without privileges on the bookkeeping tables; the pinned search_path keeps it
        # from resolving anything through the caller's path.
        f"CREATE OR REPLACE FUNCTION {func}() RETURNS trigger"
        " LANGUAGE plpgsql SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS $body$"
        " DECLARE r record;"
        " BEGIN"
        f"  FOR r IN SELECT id, view_schema, view_name FROM {state}"
        "   WHERE TG_RELID = ANY (source_oids) LOOP"
        f"   INSERT INTO {changes} (view_id, txid)"
        "    VALUES (r.id, pg_current_xact_id()::text::bigint)"
        "    ON CONFLICT DO NOTHING;"
        f"   PERFORM pg_notify('{CHANNEL}', r.view_schema || '.' || r.view_name);"
        "  END LOOP;"
        "  RETURN NULL;"
        " END $body$",
        _refresh_function(preparer, state, changes),
    ]


def _refresh_function(preparer: IdentifierPreparer, state: str, changes: str) -> str:
    """``CREATE FUNCTION`` of :data:`REFRESH_FUNCTION` (see :func:`refresh_and_record`)."""
    return _REFRESH_FUNCTION_TEMPLATE.format(
        func=_q(preparer, STATE_SCHEMA, REFRESH_FUNCTION),
        state=state,
        changes=changes,
        channel=CHANNEL,
        mark=ADVISORY_TIMEOUT_MARK,
    )


# The one implementation of "refresh one view and record it", shared by the runner
# (refresh_views and friends, the worker) and pg_cron jobs, so that a scheduled refresh
# clears the staleness marks and records itself like any other.
#
# Not SECURITY DEFINER: the refresh must run with the caller's privileges (only the view's
# owner may refresh it), and callers already write the bookkeeping tables themselves. No
# pinned search_path either, so the view's own functions resolve as in a bare REFRESH;
# everything here is schema-qualified instead. Names arrive as arguments and reach SQL
# only through quote_ident() (what format('%I') does; a percent sign here would be taken
# for a placeholder by pyformat drivers when the function is created).
_REFRESH_FUNCTION_TEMPLATE = """
CREATE OR REPLACE FUNCTION {func}(
    target_schema text, target_name text, lock_key bigint,
    refresh_concurrently boolean DEFAULT false, lock_mode text DEFAULT 'skip',
    only_if_stale boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql VOLATILE AS $body$
DECLARE
    target text := pg_catalog.quote_ident(target_schema) || '.'
                   || pg_catalog.quote_ident(target_name);
    target_oid oid;
    view_snapshot pg_catalog.pg_snapshot;
    started timestamptz;
    spent double precision;
    dep_schemas text[];
    dep_names text[];
BEGIN
    IF lock_mode = 'skip' THEN
        IF NOT pg_catalog.pg_try_advisory_xact_lock(lock_key) THEN
            RETURN 'skipped_locked';
        END IF;
    ELSIF lock_mode = 'wait' THEN
        BEGIN
            PERFORM pg_catalog.pg_advisory_xact_lock(lock_key);
        EXCEPTION WHEN lock_not_available THEN
            -- Tells the caller the wait for another refresher timed out, not the REFRESH.
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
                MESSAGE = '{mark} ' || target,
                HINT = 'another process is refreshing it; raise lock_timeout or skip it';
        END;
    ELSIF lock_mode IS DISTINCT FROM 'none' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'lock_mode ' || pg_catalog.quote_nullable(lock_mode)
                      || ': pass skip, wait or none';
    END IF;
    -- Checked under the lock: another process may have refreshed it a moment ago.
    IF only_if_stale AND NOT EXISTS (
        SELECT 1 FROM {state} s JOIN {changes} c ON c.view_id = s.id
         WHERE s.view_schema = target_schema AND s.view_name = target_name) THEN
        RETURN 'skipped_fresh';
    END IF;
    -- Taken before the REFRESH, whose own snapshot is later and so sees at least as much:
    -- every change visible here is in the refreshed data.
    view_snapshot := pg_catalog.pg_current_snapshot();
    started := pg_catalog.clock_timestamp();
    IF refresh_concurrently THEN
        EXECUTE 'REFRESH MATERIALIZED VIEW CONCURRENTLY ' || target;
    ELSE
        EXECUTE 'REFRESH MATERIALIZED VIEW ' || target;
    END IF;
    spent := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - started);
    target_oid := pg_catalog.to_regclass(target);
    INSERT INTO {state} (view_schema, view_name) VALUES (target_schema, target_name)
        ON CONFLICT (view_schema, view_name) DO NOTHING;
    -- A change committed while the refresh ran is invisible to view_snapshot: its row
    -- stays, and so does the view's staleness.
    WITH covered AS (
        DELETE FROM {changes} c USING {state} s
         WHERE s.view_schema = target_schema AND s.view_name = target_name
           AND c.view_id = s.id
           AND (pg_catalog.pg_visible_in_snapshot(c.txid::text::xid8, view_snapshot)
                OR c.txid = pg_catalog.pg_current_xact_id_if_assigned()::text::bigint)
        RETURNING c.id)
    UPDATE {state}
       SET refreshed_version = GREATEST(refreshed_version,
                                        COALESCE((SELECT max(id) FROM covered), 0)),
           last_refreshed_at = pg_catalog.clock_timestamp(),
           last_duration = spent,
           last_concurrently = refresh_concurrently,
           refresh_count = refresh_count + 1
     WHERE view_schema = target_schema AND view_name = target_name;
    -- The materialized views reading this one, directly or through plain views only.
    SELECT pg_catalog.array_agg(deps.nspname ORDER BY deps.nspname, deps.relname),
           pg_catalog.array_agg(deps.relname ORDER BY deps.nspname, deps.relname)
      INTO dep_schemas, dep_names
      FROM (WITH RECURSIVE readers(oid, relkind) AS (
                SELECT r.ev_class, c.relkind
                  FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
                  JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                 WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND d.deptype = 'n' AND d.refobjid = target_oid
                   AND r.ev_class <> target_oid
              UNION
                SELECT r.ev_class, c.relkind
                  FROM readers
                  JOIN pg_catalog.pg_depend d ON d.refobjid = readers.oid
                  JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
                  JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                 WHERE readers.relkind = 'v'
                   AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND d.deptype = 'n' AND r.ev_class <> readers.oid)
            SELECT DISTINCT n.nspname::text AS nspname, c.relname::text AS relname
              FROM readers
              JOIN pg_catalog.pg_class c ON c.oid = readers.oid
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE readers.relkind = 'm' AND readers.oid <> target_oid) AS deps;
    IF dep_names IS NOT NULL THEN
        INSERT INTO {state} (view_schema, view_name)
            SELECT * FROM unnest(dep_schemas, dep_names)
            ON CONFLICT (view_schema, view_name) DO NOTHING;
        INSERT INTO {changes} (view_id, txid)
            SELECT s.id, pg_catalog.pg_current_xact_id()::text::bigint
              FROM {state} s
              JOIN unnest(dep_schemas, dep_names) AS d(sch, nam)
                ON s.view_schema = d.sch AND s.view_name = d.nam
            ON CONFLICT DO NOTHING;
        PERFORM pg_catalog.pg_notify('{channel}', d.sch || '.' || d.nam)
           FROM unnest(dep_schemas, dep_names) AS d(sch, nam);
    END IF;
    RETURN 'refreshed';
END
$body$
"""


def state_tables_exist(conn: Connection) -> bool:
    """True when the state table, the change log and both functions all exist."""
    return bool(
        conn.execute(
            sa.text(
                "SELECT to_regclass(:state) IS NOT NULL AND to_regclass(:changes) IS NOT NULL"
                " AND to_regprocedure(:func) IS NOT NULL AND to_regprocedure(:refresh) IS NOT NULL"
            ),
            {
                "state": f"{STATE_SCHEMA}.{STATE_TABLE}",
                "changes": f"{STATE_SCHEMA}.{CHANGES_TABLE}",
                "func": f"{STATE_SCHEMA}.{TRIGGER_FUNCTION}()",
                "refresh": f"{STATE_SCHEMA}.{REFRESH_FUNCTION}({_REFRESH_ARGS})",
            },
        ).scalar_one()
    )


def _constant(text: str) -> Callable[[IdentifierPreparer], str]:
    return lambda _preparer: text


def ensure_state_tables(conn: Connection) -> None:
    """Create the bookkeeping tables, the trigger function and the refresh function if
    missing (safe to race).

    Example::

        with engine.begin() as conn:
            ensure_state_tables(conn)
    """
    if state_tables_exist(conn):
        return
    conn.execute(
        sa.select(sa.func.pg_advisory_xact_lock(sa.literal(_SETUP_LOCK_KEY, sa.BigInteger)))
    )
    for statement in _setup_statements(conn.dialect.identifier_preparer):
        conn.execute(PreparedDDL(_constant(statement)))


# -- installing and removing triggers -----------------------------------------------------

_RESOLVE = sa.text(
    """
    SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = :name
       AND (n.nspname = :schema
            OR (CAST(:schema AS text) IS NULL AND pg_catalog.pg_table_is_visible(c.oid)))
     ORDER BY pg_catalog.pg_table_is_visible(c.oid) DESC
     LIMIT 1
    """
)

# Plain views are looked through to the tables they read, recursively; materialized views
# are not: their own refreshes mark their dependents stale.
_BASE_TABLES = sa.text(
    """
    WITH RECURSIVE rels(oid) AS (
        SELECT unnest(CAST(:oids AS oid[]))
      UNION
        SELECT d.refobjid
          FROM rels
          JOIN pg_catalog.pg_class c ON c.oid = rels.oid AND c.relkind = 'v'
          JOIN pg_catalog.pg_rewrite r ON r.ev_class = c.oid
          JOIN pg_catalog.pg_depend d ON d.objid = r.oid
               AND d.classid = 'pg_catalog.pg_rewrite'::regclass
               AND d.refclassid = 'pg_catalog.pg_class'::regclass
               AND d.deptype = 'n' AND d.refobjid <> c.oid
    )
    SELECT c.oid, n.nspname, c.relname
      FROM rels
      JOIN pg_catalog.pg_class c ON c.oid = rels.oid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     ORDER BY n.nspname, c.relname
    """
)

_HAS_TRIGGER = sa.text(
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger"
    " WHERE tgrelid = CAST(:oid AS oid) AND tgname = :name)"
)


def _current_schema(conn: Connection) -> str:
    return str(conn.execute(sa.text("SELECT current_schema()")).scalar_one())


def _trigger_ddl(schema: str, table: str, drop: bool) -> PreparedDDL:
    def build(preparer: IdentifierPreparer) -> str:
        target = preparer.format_table(sa.table(table, schema=schema))
        trigger = preparer.quote(TRIGGER_NAME)
        if drop:
            return f"DROP TRIGGER IF EXISTS {trigger} ON {target}"
        return (
            f"CREATE TRIGGER {trigger}"
            f" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {target}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION {_q(preparer, STATE_SCHEMA, TRIGGER_FUNCTION)}()"
        )

    return PreparedDDL(build)


def install_tracking(
    conn: Connection,
    view_schema: str | None,
    view_name: str,
    sources: Sequence[tuple[str | None, str]],
) -> None:
    """Track ``view_schema.view_name``: writes to ``sources`` mark it stale (idempotent).

    ``sources`` are ``(schema, name)`` of what the view reads (``None`` schema: resolved
    through ``search_path``). Plain views among them are looked through to their tables;
    materialized views are skipped (refreshing them marks this view stale). Runs in the
    caller's transaction; re-running it replaces the tracked set of tables.

    Example (what ``create_all`` does for ``track_changes=True``)::

        with engine.begin() as conn:
            install_tracking(conn, None, "mv_daily", [(None, "events")])
    """
    ensure_state_tables(conn)
    schema = view_schema or _current_schema(conn)
    oids: list[int] = []
    for source_schema, source_name in sources:
        row = conn.execute(_RESOLVE, {"schema": source_schema, "name": source_name}).first()
        if row is None:
            label = f"{source_schema}.{source_name}" if source_schema else source_name
            raise TrackingError(
                f"cannot track materialized view '{schema}.{view_name}': its source {label!r} "
                "does not exist; create the table first (create_all orders it before the view)"
            )
        oids.append(int(row.oid))
    tables = conn.execute(_BASE_TABLES, {"oids": oids}).all()
    if sources and not tables:
        log.warning(
            "materialized view %s.%s: track_changes found no base table among its sources; "
            "only refreshes of the views it reads will mark it stale",
            schema,
            view_name,
        )
    conn.execute(
        sa.text(
            f"INSERT INTO {STATE_SCHEMA}.{STATE_TABLE}"
            " (view_schema, view_name, tracked, source_oids)"
            " VALUES (:schema, :name, true, CAST(:oids AS oid[]))"
            " ON CONFLICT (view_schema, view_name) DO UPDATE"
            " SET tracked = true, source_oids = EXCLUDED.source_oids"
        ),
        {"schema": schema, "name": view_name, "oids": [int(t.oid) for t in tables]},
    )
    for table in tables:
        if not conn.execute(_HAS_TRIGGER, {"oid": int(table.oid), "name": TRIGGER_NAME}).scalar():
            conn.execute(_trigger_ddl(table.nspname, table.relname, drop=False))
    _drop_unused_triggers(conn)
    log.info(
        "change tracking installed for %s.%s on %s",
        schema,
        view_name,
        ", ".join(f"{t.nspname}.{t.relname}" for t in tables) or "no table",
    )


_UNUSED_TRIGGERS = sa.text(
    f"""
    SELECT n.nspname, c.relname
      FROM pg_catalog.pg_trigger t
      JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE t.tgname = :name
       AND NOT EXISTS (SELECT 1 FROM {STATE_SCHEMA}.{STATE_TABLE} s
                        WHERE s.tracked AND t.tgrelid = ANY (s.source_oids))
    """
)


def _drop_unused_triggers(conn: Connection) -> None:
    for row in conn.execute(_UNUSED_TRIGGERS, {"name": TRIGGER_NAME}).all():
        conn.execute(_trigger_ddl(row.nspname, row.relname, drop=True))


def uninstall_tracking(conn: Connection, view_schema: str | None, view_name: str) -> None:
    """Stop tracking the view: forget its state and drop triggers no other view needs.

    Idempotent, and a no-op when tracking was never set up in this database.

    Example (what ``drop_all`` does before dropping a tracked view)::

        with engine.begin() as conn:
            uninstall_tracking(conn, None, "mv_daily")
    """
    if not state_tables_exist(conn):
        return
    schema = view_schema or _current_schema(conn)
    params = {"schema": schema, "name": view_name}
    conn.execute(
        sa.text(
            f"DELETE FROM {STATE_SCHEMA}.{CHANGES_TABLE} c USING {STATE_SCHEMA}.{STATE_TABLE} s"
            " WHERE c.view_id = s.id AND s.view_schema = :schema AND s.view_name = :name"
        ),
        params,
    )
    conn.execute(
        sa.text(
            f"DELETE FROM {STATE_SCHEMA}.{STATE_TABLE}"
            " WHERE view_schema = :schema AND view_name = :name"
        ),
        params,
    )
    _drop_unused_triggers(conn)


def tracking_installed(conn: Connection) -> set[tuple[str, str]]:
    """``(schema, name)`` of every view whose change tracking is installed."""
    if not state_tables_exist(conn):
        return set()
    rows = conn.execute(
        sa.text(f"SELECT view_schema, view_name FROM {STATE_SCHEMA}.{STATE_TABLE} WHERE tracked")
    )
    return {(r.view_schema, r.view_name) for r in rows}


_STATES = sa.text(
    f"""
    SELECT s.view_schema, s.view_name, s.tracked, s.refreshed_version, s.last_refreshed_at,
           s.last_duration, s.last_concurrently, s.refresh_count,
           COALESCE(c.pending, 0) AS pending, c.max_id, c.stale_since,
           ARRAY(SELECT n.nspname || '.' || r.relname
                   FROM unnest(s.source_oids) AS o(oid)
                   JOIN pg_catalog.pg_class r ON r.oid = o.oid
                   JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
                  ORDER BY 1) AS sources
      FROM {STATE_SCHEMA}.{STATE_TABLE} s
      LEFT JOIN LATERAL (
           SELECT count(*) AS pending, max(id) AS max_id, min(changed_at) AS stale_since
             FROM {STATE_SCHEMA}.{CHANGES_TABLE} WHERE view_id = s.id) c ON true
     ORDER BY s.view_schema, s.view_name
    """
)


def view_states(conn: Connection) -> dict[tuple[str, str], ViewState]:
    """Every view the state table knows (tracked, or refreshed through this library).

    Empty when tracking was never set up. One query.

    Example::

        with engine.connect() as conn:
            for (schema, name), state in view_states(conn).items():
                print(schema, name, state.stale, state.last_refreshed_at)
    """
    if not state_tables_exist(conn):
        return {}
    out: dict[tuple[str, str], ViewState] = {}
    for r in conn.execute(_STATES):
        pending = int(r.pending)
        out[(r.view_schema, r.view_name)] = ViewState(
            schema=r.view_schema,
            name=r.view_name,
            tracked=bool(r.tracked),
            stale=pending > 0,
            stale_since=r.stale_since,
            pending_changes=pending,
            version=max(int(r.max_id or 0), int(r.refreshed_version)),
            refreshed_version=int(r.refreshed_version),
            last_refreshed_at=r.last_refreshed_at,
            last_duration=r.last_duration,
            last_concurrently=r.last_concurrently,
            refresh_count=int(r.refresh_count),
            sources=tuple(r.sources or ()),
        )
    return out


# -- what the runner needs ----------------------------------------------------------------------

_STALE = sa.text(
    f"SELECT s.view_schema, s.view_name FROM {STATE_SCHEMA}.{STATE_TABLE} s"
    f" WHERE EXISTS (SELECT 1 FROM {STATE_SCHEMA}.{CHANGES_TABLE} c WHERE c.view_id = s.id)"
)


def stale_views(conn: Connection) -> set[tuple[str, str]]:
    """``(schema, name)`` of every view with uncovered changes (one query)."""
    return {(r.view_schema, r.view_name) for r in conn.execute(_STALE)}


def refresh_call(
    schema: str,
    name: str,
    *,
    concurrently: bool,
    lock: str = "skip",
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
) -> sa.Select[tuple[str]]:
    """``SELECT public.sqlalchemy_matview_refresh(...)`` for one view.

    The runner executes it; :func:`~sqlalchemy_matview.schedule_refresh` compiles it with
    literal values into a pg_cron job's command. The function takes the view's advisory
    lock (``lock``: ``"skip"``, ``"wait"`` or ``"none"``), returns ``"skipped_locked"`` or,
    with ``only_if_stale``, ``"skipped_fresh"`` when there is nothing to do, and otherwise
    refreshes the view, clears the changes its snapshot covered, records the refresh and
    marks the materialized views reading it stale, returning ``"refreshed"``.

    Example::

        status = conn.scalar(refresh_call("public", "mv_daily", concurrently=True))
    """
    call = getattr(sa.func, STATE_SCHEMA)
    return sa.select(
        getattr(call, REFRESH_FUNCTION)(
            sa.literal(schema, sa.Text),
            sa.literal(name, sa.Text),
            sa.literal(lock_key((schema, name), namespace=lock_namespace), sa.BigInteger),
            sa.literal(bool(concurrently), sa.Boolean),
            sa.literal(lock, sa.Text),
            sa.literal(bool(only_if_stale), sa.Boolean),
            type_=sa.Text,
        )
    )


def refresh_and_record(
    conn: Connection,
    schema: str,
    name: str,
    *,
    concurrently: bool,
    lock: str = "skip",
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
) -> str:
    """Run :func:`refresh_call` in the caller's transaction; returns the status.

    A wait for another refresher's lock that runs into ``lock_timeout`` raises an error
    for which :func:`is_lock_wait_timeout` is true.
    """
    call = refresh_call(
        schema,
        name,
        concurrently=concurrently,
        lock=lock,
        only_if_stale=only_if_stale,
        lock_namespace=lock_namespace,
    )
    return str(conn.execute(call).scalar_one())


def is_lock_wait_timeout(exc: BaseException) -> bool:
    """True for the error of a ``lock="wait"`` refresh that gave up waiting for the lock."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "55P03" and ADVISORY_TIMEOUT_MARK in str(exc)


# -- create_all / drop_all -------------------------------------------------------------------


def _source_names(view: MaterializedView) -> list[tuple[str | None, str]]:
    return [(t.schema, t.name) for t in view.sources if t is not view.table]


def attach(view: MaterializedView) -> None:
    """Make ``create_all`` install, and ``drop_all`` remove, the view's change tracking.

    Called by ``MaterializedView(..., track_changes=True)``; idempotent.

    Example::

        mv = MaterializedView("mv_counts", metadata, select(...), track_changes=True)
        metadata.create_all(engine)   # triggers are on the source tables now
    """
    if sa.event.contains(view.table, "after_create", _after_create):
        return
    sa.event.listen(view.table, "after_create", _after_create)
    sa.event.listen(view.table, "before_drop", _before_drop)


def _after_create(target: sa.Table, connection: Connection, **kw: Any) -> None:
    view = target.info.get("sqlalchemy_matview")
    if isinstance(view, MaterializedView) and view.track_changes:
        install_tracking(connection, view.schema, view.name, _source_names(view))


def _before_drop(target: sa.Table, connection: Connection, **kw: Any) -> None:
    view = target.info.get("sqlalchemy_matview")
    if isinstance(view, MaterializedView):
        uninstall_tracking(connection, view.schema, view.name)
