"""Durable change tracking: triggers, a change log, and per-view state, in a schema of its own.

The bookkeeping lives in the schema :func:`~sqlalchemy_matview.bookkeeping.tracking_schema`
names (``sqlalchemy_matview`` unless :func:`~sqlalchemy_matview.bookkeeping.set_tracking_schema`
says otherwise), created by the library on first use and never part of your ``MetaData``:
the tables ``views``, ``changes`` and ``history``, the sequences ``barrier_secret`` and
``epoch``, and the functions ``mark_stale`` (the triggers', with ``mark_views``),
``refresh``, ``track``, ``untrack`` and ``sync_triggers``, among others. The design --
writers that never queue on each other or on ``NOTIFY``, refreshes that never lose a
change -- is described in :mod:`~sqlalchemy_matview.orchestration.tracking_sql` and
``docs/change-tracking.md``.

Before using bookkeeping objects that already exist, :func:`ensure_bookkeeping` checks
that they are owned by the current role (or a role it is a member of, or a superuser) and
otherwise raises :class:`~sqlalchemy_matview.errors.TrackingInstallError`: another role
could otherwise have created them first and have its code run with the app's privileges.

Databases tracked by release 0.1.0 (bookkeeping in ``public``) are moved on the first
:func:`ensure_bookkeeping`: what was tracked is tracked again in the new schema, pending
changes stay pending, and the old triggers, tables and functions are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..bookkeeping import (
    CHANGES_TABLE,
    CHANNEL,
    HISTORY_TABLE,
    LEGACY_SCHEMA,
    LEGACY_TRIGGER,
    VIEWS_TABLE,
    register_tracking_hooks,
    tracking_schema,
)
from ..errors import MaterializedViewError, TrackingInstallError
from ..schema import MaterializedView, materialized_views
from ._sql import CompiledDDL, PreparedDDL
from .locking import lock_key
from .tracking_sql import (
    ADVISORY_TIMEOUT_MARK,
    EPOCH_SEQUENCE,
    FUNCTIONS,
    MARKER,
    SECRET_SEQUENCE,
    SETUP_LOCK_KEY,
    setup_statements,
)

__all__ = [
    "CHANNEL",
    "PENDING_CAP",
    "Inventory",
    "TrackingError",
    "TrackingProblem",
    "ViewState",
    "bookkeeping_installed",
    "bookkeeping_inventory",
    "check_tracking",
    "ensure_bookkeeping",
    "install_tracking",
    "is_lock_wait_timeout",
    "refresh_and_record",
    "refresh_call",
    "stale_views",
    "tracking_installed",
    "uninstall_bookkeeping",
    "uninstall_tracking",
    "view_states",
]

log = logging.getLogger("sqlalchemy_matview")

#: :attr:`ViewState.pending_changes` counts at most this many (it is a lower bound then),
#: so that a status query never scans a change log that grew while nothing refreshed.
PENDING_CAP = 1000


class TrackingError(MaterializedViewError, RuntimeError):
    """Change tracking could not be installed (e.g. a source table does not exist)."""


@dataclass(frozen=True)
class ViewState:
    """What the bookkeeping says about one view (see :func:`view_states`)."""

    schema: str
    name: str
    #: Triggers are installed on its sources (``track_changes=True``).
    tracked: bool
    #: Changes were committed that no refresh has covered yet.
    stale: bool
    #: When the oldest uncovered change was made (``None`` when fresh).
    stale_since: datetime | None
    #: Marks not covered yet, counted up to :data:`PENDING_CAP`: at least 1 when stale. A
    #: writing transaction adds one only when it finds none (or runs during a refresh, or
    #: under REPEATABLE READ / SERIALIZABLE), so this is not a count of transactions.
    pending_changes: int
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


# -- the bookkeeping objects ---------------------------------------------------------------


def _quoted(conn: Connection, schema: str) -> str:
    return str(conn.dialect.identifier_preparer.quote_schema(schema))


def _constant(text: str) -> CompiledDDL:
    return PreparedDDL(lambda _preparer: text)


# Whom the current role trusts: itself, a role it is a member of (explicitly: pg_has_role() is
# true for any role when the caller is a superuser, the very case where trusting a squatter is
# worst), or a superuser. _MEMBERS starts a query (the memberships, computed once); _TRUSTED
# is the test of one owner in it.
_MEMBERS = (
    "WITH RECURSIVE m(r) AS ("
    " SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
    " UNION SELECT a.roleid FROM pg_catalog.pg_auth_members a JOIN m ON a.member = m.r)"
)
_TRUSTED = (
    "({owner} IN (SELECT m.r FROM m)"
    " OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = {owner}))"
)

# Every object in the bookkeeping schema, and the schema itself, with its owner and whether
# the current role may trust it. Every refresh plans with this query: it is kept cheap.
# INVENTORY_CTES / INVENTORY_ROWS are also composed into the refresh plan's single query.
# The schema's objects are found through their dependency on it (an index scan of
# pg_depend): pg_proc and pg_class have no index on their namespace, and scanning them cost
# 0.4 ms in an empty database, growing with every function and table of the database.
# Every function, table, view, sequence and type records that dependency when created or
# moved (ALTER ... SET SCHEMA); indexes do not, but an index belongs to its table's owner.
# The comment is read from pg_description directly: obj_description() is a SQL function
# that looks up pg_namespace's oid at every call.
INVENTORY_CTES = f"""
    {_MEMBERS},
    bk(oid, name, owner, marker) AS (
        SELECT n.oid, n.nspname::text, n.nspowner,
               (SELECT d.description FROM pg_catalog.pg_description d
                 WHERE d.objoid = n.oid AND d.objsubid = 0
                   AND d.classoid = 'pg_catalog.pg_namespace'::pg_catalog.regclass)
          FROM pg_catalog.pg_namespace n WHERE n.nspname = :schema),
    inside(classid, objid) AS (
        SELECT d.classid, d.objid FROM pg_catalog.pg_depend d JOIN bk ON d.refobjid = bk.oid
         WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass),
    owned(kind, name, owner, marker) AS (
        SELECT 'schema', bk.name, bk.owner, bk.marker FROM bk
        UNION ALL
        SELECT 'relation', bk.name || '.' || c.relname, c.relowner, NULL
          FROM inside o JOIN pg_catalog.pg_class c ON c.oid = o.objid, bk
         WHERE o.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
        UNION ALL
        SELECT 'function', bk.name || '.' || p.proname, p.proowner, NULL
          FROM inside o JOIN pg_catalog.pg_proc p ON p.oid = o.objid, bk
         WHERE o.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
        UNION ALL
        SELECT 'type', bk.name || '.' || t.typname, t.typowner, NULL
          FROM inside o JOIN pg_catalog.pg_type t ON t.oid = o.objid, bk
         WHERE o.classid = 'pg_catalog.pg_type'::pg_catalog.regclass)
    """
INVENTORY_ROWS = f"""
    SELECT o.kind, o.name, pg_catalog.pg_get_userbyid(o.owner)::text AS owner,
           {_TRUSTED.format(owner="o.owner")} AS trusted, o.marker
      FROM owned o
    """
_INVENTORY = sa.text(INVENTORY_CTES + INVENTORY_ROWS)


@dataclass(frozen=True)
class Inventory:
    """What :func:`bookkeeping_inventory` found in the bookkeeping schema."""

    #: The schema exists and everything in it is owned by a role the current one trusts.
    exists: bool
    #: ... and every object of this version is present (the marker matches).
    current: bool


def _inventory(conn: Connection, schema: str, *, strict: bool) -> Inventory:
    return judge_inventory(
        conn.execute(_INVENTORY, {"schema": schema}).all(), schema, strict=strict
    )


def judge_inventory(rows: Sequence[Any], schema: str, *, strict: bool = False) -> Inventory:
    """The :class:`Inventory` of ``rows`` read by ``INVENTORY_ROWS`` (``kind``, ``name``,
    ``owner``, ``trusted``, ``marker``): untrusted objects make it absent (a warning, or
    with ``strict`` a :class:`~sqlalchemy_matview.errors.TrackingInstallError`)."""
    for row in rows:
        if not row.trusted:
            message = (
                f"the change-tracking {row.kind} {row.name!r} is owned by role {row.owner!r}, "
                "which the current role neither is nor belongs to: another role may have "
                "created it to run code with your privileges. Drop it (as a superuser) or "
                "name another schema with set_tracking_schema(metadata, ...)"
            )
            if strict:
                raise TrackingInstallError(message)
            log.warning("change tracking ignored: %s", message)
            return Inventory(exists=False, current=False)
    marker = next((r.marker for r in rows if r.kind == "schema"), None)
    names = {r.name for r in rows}
    tables = (VIEWS_TABLE, CHANGES_TABLE, HISTORY_TABLE, SECRET_SEQUENCE, EPOCH_SEQUENCE)
    complete = {f"{schema}.{t}" for t in tables} | {f"{schema}.{f}" for f in FUNCTIONS}
    return Inventory(exists=bool(rows), current=marker == MARKER and complete <= names)


def bookkeeping_inventory(conn: Connection, schema: str | None = None) -> Inventory:
    """Whether the bookkeeping exists, is trustworthy, and is at this version (one query).

    Objects owned by a role the current one does not trust make it count as absent (with a
    warning): nothing of theirs is ever called.
    """
    return _inventory(conn, schema or tracking_schema(), strict=False)


def bookkeeping_installed(conn: Connection, schema: str | None = None) -> bool:
    """True when the bookkeeping is installed (at this version) and trustworthy.

    Objects owned by a role the current one does not trust count as absent (with a
    warning): nothing of theirs is ever called.
    """
    return bookkeeping_inventory(conn, schema).current


def ensure_bookkeeping(conn: Connection, schema: str | None = None) -> None:
    """Create (or upgrade) the bookkeeping schema, tables and functions; safe to race.

    Raises :class:`~sqlalchemy_matview.errors.TrackingInstallError` naming an existing
    object and its owner when that owner is not trusted (see the module docstring). Also
    moves the bookkeeping of release 0.1.0 out of ``public``.

    Example::

        with engine.begin() as conn:
            ensure_bookkeeping(conn)
    """
    schema = schema or tracking_schema()
    if _inventory(conn, schema, strict=True).current and not _legacy_present(conn):
        return
    conn.execute(
        sa.select(sa.func.pg_advisory_xact_lock(sa.literal(SETUP_LOCK_KEY, sa.BigInteger)))
    )
    inventory = _inventory(conn, schema, strict=True)  # again, under the lock
    quoted = _quoted(conn, schema)
    if not inventory.current:
        if not inventory.exists:
            conn.execute(_constant(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
        for statement in setup_statements(quoted, schema):
            conn.execute(_constant(statement))
        log.info("change-tracking bookkeeping installed in schema %s", schema)
    _move_legacy(conn, schema)


# -- 0.1.0's bookkeeping in public ---------------------------------------------------------------

_LEGACY_STATE = f"{LEGACY_SCHEMA}.sqlalchemy_matview_state"
_LEGACY_CHANGES = f"{LEGACY_SCHEMA}.sqlalchemy_matview_changes"
_LEGACY_FUNCTIONS = (
    f"{LEGACY_SCHEMA}.sqlalchemy_matview_mark_stale()",
    f"{LEGACY_SCHEMA}.sqlalchemy_matview_refresh(text, text, bigint, boolean, text, boolean)",
)


def _legacy_present(conn: Connection) -> bool:
    return bool(
        conn.execute(
            sa.text("SELECT pg_catalog.to_regclass(:state) IS NOT NULL"), {"state": _LEGACY_STATE}
        ).scalar()
    )


def _move_legacy(conn: Connection, schema: str) -> None:
    if not _legacy_present(conn):
        return
    owner = conn.execute(
        sa.text(
            f"{_MEMBERS} SELECT pg_catalog.pg_get_userbyid(c.relowner)::text AS owner,"
            f" {_TRUSTED.format(owner='c.relowner')} AS trusted"
            " FROM pg_catalog.pg_class c"
            " WHERE c.oid = pg_catalog.to_regclass(:state)::pg_catalog.oid"
        ),
        {"state": _LEGACY_STATE},
    ).one()
    if not owner.trusted:
        raise TrackingInstallError(
            f"table {_LEGACY_STATE!r} (change tracking of sqlalchemy-matview 0.1.0) is owned "
            f"by role {owner.owner!r}, which the current role neither is nor belongs to; "
            "drop it as a superuser, then run create_all again"
        )
    rows = conn.execute(
        sa.text(
            "SELECT s.view_schema, s.view_name, s.tracked,"
            " ARRAY(SELECT o.oid::pg_catalog.regclass FROM pg_catalog.unnest(s.source_oids)"
            "       AS o(oid) JOIN pg_catalog.pg_class c ON c.oid = o.oid) AS sources,"
            f" EXISTS (SELECT 1 FROM {_LEGACY_CHANGES} c WHERE c.view_id = s.id) AS stale"
            f" FROM {_LEGACY_STATE} s"
        )
    ).all()
    quoted = _quoted(conn, schema)
    for row in rows:
        if row.tracked:
            conn.execute(
                sa.text(f"SELECT {quoted}.track(:s, :n, CAST(:src AS pg_catalog.regclass[]))"),
                {"s": row.view_schema, "n": row.view_name, "src": [str(r) for r in row.sources]},
            )
        if row.stale:
            _mark_stale_now(conn, quoted, row.view_schema, row.view_name)
    # Dropping the old function drops the old triggers that call it.
    for signature in _LEGACY_FUNCTIONS:
        conn.execute(_constant(f"DROP FUNCTION IF EXISTS {signature} CASCADE"))
    conn.execute(_constant(f"DROP TABLE IF EXISTS {_LEGACY_CHANGES}, {_LEGACY_STATE}"))
    log.warning(
        "moved the change tracking of %d view(s) from schema public to %s (sqlalchemy-matview "
        "0.1.0's layout); pg_cron jobs made by 0.1.0 call a function that no longer exists: "
        "run schedule_refresh() again for each",
        len(rows),
        schema,
    )


def _mark_stale_now(conn: Connection, quoted: str, view_schema: str, view_name: str) -> None:
    conn.execute(
        sa.text(
            f"INSERT INTO {quoted}.{VIEWS_TABLE} (view_schema, view_name) VALUES (:s, :n)"
            " ON CONFLICT (view_schema, view_name) DO NOTHING"
        ),
        {"s": view_schema, "n": view_name},
    )
    conn.execute(
        sa.text(
            f"INSERT INTO {quoted}.{CHANGES_TABLE} (view_id, txid)"
            " SELECT v.id, pg_catalog.pg_current_xact_id()::text::bigint"
            f" FROM {quoted}.{VIEWS_TABLE} v"
            " WHERE v.view_schema = :s AND v.view_name = :n ON CONFLICT DO NOTHING"
        ),
        {"s": view_schema, "n": view_name},
    )


def uninstall_bookkeeping(conn: Connection, schema: str | None = None) -> None:
    """Remove every object of change tracking: triggers, tables, functions, the schema.

    Also 0.1.0's objects in ``public``. Idempotent. Refuses (``TrackingInstallError``) to
    drop a schema holding objects the current role does not trust.
    """
    schema = schema or tracking_schema()
    inventory = _inventory(conn, schema, strict=True)
    for signature in _LEGACY_FUNCTIONS:
        conn.execute(_constant(f"DROP FUNCTION IF EXISTS {signature} CASCADE"))
    conn.execute(_constant(f"DROP TABLE IF EXISTS {_LEGACY_CHANGES}, {_LEGACY_STATE}"))
    if inventory.exists:
        # The triggers depend on mark_stale(): CASCADE drops them with it.
        conn.execute(_constant(f"DROP SCHEMA {_quoted(conn, schema)} CASCADE"))


# -- installing and removing a view's tracking ----------------------------------------------

_RESOLVE = sa.text(
    """
    SELECT c.oid::pg_catalog.regclass::text AS rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relname = :name
       AND (n.nspname = :schema
            OR (CAST(:schema AS text) IS NULL AND pg_catalog.pg_table_is_visible(c.oid)))
     ORDER BY pg_catalog.pg_table_is_visible(c.oid) DESC
     LIMIT 1
    """
)


def _current_schema(conn: Connection) -> str:
    return str(conn.execute(sa.text("SELECT pg_catalog.current_schema()")).scalar_one())


def install_tracking(
    conn: Connection,
    view_schema: str | None,
    view_name: str,
    sources: Sequence[tuple[str | None, str]],
    *,
    schema: str | None = None,
) -> None:
    """Track ``view_schema.view_name``: writes to ``sources`` mark it stale (idempotent).

    ``sources`` are ``(schema, name)`` of what the view reads (``None`` schema: resolved
    through ``search_path``). Plain views among them are looked through to their tables;
    materialized views are skipped (refreshing them marks this view stale). Runs in the
    caller's transaction; re-running it replaces the tracked set of tables and repairs
    missing or altered triggers. ``schema`` is the bookkeeping schema.

    Example (what ``create_all`` does for ``track_changes=True``)::

        with engine.begin() as conn:
            install_tracking(conn, None, "mv_daily", [(None, "events")])
    """
    schema = schema or tracking_schema()
    ensure_bookkeeping(conn, schema)
    target_schema = view_schema or _current_schema(conn)
    rels: list[str] = []
    for source_schema, source_name in sources:
        rel = conn.execute(_RESOLVE, {"schema": source_schema, "name": source_name}).scalar()
        if rel is None:
            label = f"{source_schema}.{source_name}" if source_schema else source_name
            raise TrackingError(
                f"cannot track materialized view '{target_schema}.{view_name}': its source "
                f"{label!r} does not exist; create the table first (create_all orders it "
                "before the view)"
            )
        rels.append(str(rel))
    # The regclass[] is parsed with the caller's search_path, which produced the names.
    tables = conn.execute(
        sa.text(
            f"SELECT ARRAY(SELECT pg_catalog.unnest({_quoted(conn, schema)}.track("
            ":s, :n, CAST(:src AS pg_catalog.regclass[])))::text)"
        ),
        {"s": target_schema, "n": view_name, "src": rels},
    ).scalar_one()
    if sources and not tables:
        log.warning(
            "materialized view %s.%s: track_changes found no base table among its sources; "
            "only refreshes of the views it reads will mark it stale",
            target_schema,
            view_name,
        )
    log.info(
        "change tracking installed for %s.%s on %s",
        target_schema,
        view_name,
        ", ".join(tables) or "no table",
    )


def uninstall_tracking(
    conn: Connection, view_schema: str | None, view_name: str, *, schema: str | None = None
) -> None:
    """Stop tracking the view: forget its state and drop triggers no other view needs.

    Idempotent, and a no-op when tracking was never set up in this database.

    Example (what ``drop_all`` does before dropping a tracked view)::

        with engine.begin() as conn:
            uninstall_tracking(conn, None, "mv_daily")
    """
    schema = schema or tracking_schema()
    if not bookkeeping_installed(conn, schema):
        return
    conn.execute(
        sa.text(f"SELECT {_quoted(conn, schema)}.untrack(:s, :n)"),
        {"s": view_schema or _current_schema(conn), "n": view_name},
    )


def tracking_installed(conn: Connection, schema: str | None = None) -> set[tuple[str, str]]:
    """``(schema, name)`` of every view whose change tracking is installed."""
    schema = schema or tracking_schema()
    if not bookkeeping_installed(conn, schema):
        return set()
    rows = conn.execute(
        sa.text(
            "SELECT view_schema, view_name"
            f" FROM {_quoted(conn, schema)}.{VIEWS_TABLE} WHERE tracked"
        )
    )
    return {(r.view_schema, r.view_name) for r in rows}


def _states_query(quoted: str) -> sa.TextClause:
    # Bounded per view: an index probe for the oldest mark and at most PENDING_CAP rows.
    return sa.text(
        f"""
        SELECT v.view_schema, v.view_name, v.tracked, v.last_refreshed_at,
               v.last_duration, v.last_concurrently, v.refresh_count,
               (SELECT pg_catalog.count(*) FROM (
                    SELECT 1 FROM {quoted}.{CHANGES_TABLE} c WHERE c.view_id = v.id
                     LIMIT {PENDING_CAP}) AS capped) AS pending,
               (SELECT c.changed_at FROM {quoted}.{CHANGES_TABLE} c WHERE c.view_id = v.id
                 ORDER BY c.txid LIMIT 1) AS stale_since,
               ARRAY(SELECT n.nspname || '.' || r.relname
                       FROM pg_catalog.unnest(v.sources) AS s(rel)
                       JOIN pg_catalog.pg_class r ON r.oid = s.rel::oid
                       JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
                      ORDER BY 1) AS sources
          FROM {quoted}.{VIEWS_TABLE} v
         ORDER BY v.view_schema, v.view_name
        """
    )


def view_states(conn: Connection, schema: str | None = None) -> dict[tuple[str, str], ViewState]:
    """Every view the bookkeeping knows (tracked, or refreshed through this library).

    Empty when tracking was never set up. One query, which never scans the change log.

    Example::

        with engine.connect() as conn:
            for (schema, name), state in view_states(conn).items():
                print(schema, name, state.stale, state.last_refreshed_at)
    """
    schema = schema or tracking_schema()
    if not bookkeeping_installed(conn, schema):
        return {}
    out: dict[tuple[str, str], ViewState] = {}
    for r in conn.execute(_states_query(_quoted(conn, schema))):
        pending = int(r.pending)
        out[(r.view_schema, r.view_name)] = ViewState(
            schema=r.view_schema,
            name=r.view_name,
            tracked=bool(r.tracked),
            stale=pending > 0,
            stale_since=r.stale_since,
            pending_changes=pending,
            last_refreshed_at=r.last_refreshed_at,
            last_duration=r.last_duration,
            last_concurrently=r.last_concurrently,
            refresh_count=int(r.refresh_count),
            sources=tuple(r.sources or ()),
        )
    return out


def stale_views(conn: Connection, schema: str | None = None) -> set[tuple[str, str]]:
    """``(schema, name)`` of every view with uncovered changes (one query)."""
    quoted = _quoted(conn, schema or tracking_schema())
    rows = conn.execute(
        sa.text(
            f"SELECT v.view_schema, v.view_name FROM {quoted}.{VIEWS_TABLE} v"
            f" WHERE EXISTS (SELECT 1 FROM {quoted}.{CHANGES_TABLE} c WHERE c.view_id = v.id)"
        )
    )
    return {(r.view_schema, r.view_name) for r in rows}


# -- checking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingProblem:
    """A declared ``track_changes=True`` view whose tracking is missing or broken."""

    #: ``schema.name`` of the view.
    view: str
    #: What is wrong, in words an operator can act on.
    problem: str


def _check(conn: Connection, metadata: sa.MetaData) -> list[TrackingProblem]:
    return _check_tracked(conn, metadata) + _check_incremental(conn, metadata)


def _check_incremental(conn: Connection, metadata: sa.MetaData) -> list[TrackingProblem]:
    """The logging of incremental views that exist (a missing one is create_all's)."""
    from . import incremental

    problems: list[TrackingProblem] = []
    current = _current_schema(conn)
    for view in materialized_views(metadata, managed=True):
        if view.incremental is None:
            continue
        view_schema = view.schema or current
        if not incremental.is_incremental(conn, view_schema, view.name, tracking_schema(metadata)):
            continue
        for problem in incremental.incremental_problems(conn, view):
            problems.append(TrackingProblem(f"{view_schema}.{view.name}", problem))
    return problems


def _check_tracked(conn: Connection, metadata: sa.MetaData) -> list[TrackingProblem]:
    schema = tracking_schema(metadata)
    views = [v for v in materialized_views(metadata, managed=True) if v.track_changes]
    if not views:
        return []
    current = _current_schema(conn)
    names = [(v.schema or current, v.name) for v in views]
    if not bookkeeping_installed(conn, schema):
        return [
            TrackingProblem(
                f"{s}.{n}",
                f"change tracking is not installed (no bookkeeping in schema {schema!r}); "
                "run metadata.create_all() or the migration that installs it",
            )
            for s, n in names
        ]
    quoted = _quoted(conn, schema)
    stored = {
        (r.view_schema, r.view_name): r
        for r in conn.execute(
            sa.text(
                f"SELECT v.view_schema, v.view_name, v.tracked,"
                " ARRAY(SELECT s.rel::oid FROM pg_catalog.unnest(v.sources) AS s(rel)) AS oids"
                f" FROM {quoted}.{VIEWS_TABLE} v"
            )
        )
    }
    found = {
        (r.view_schema, r.view_name): r.problem
        for r in conn.execute(sa.text(f"SELECT * FROM {quoted}.check_triggers()"))
    }
    problems: list[TrackingProblem] = []
    for view, (view_schema, name) in zip(views, names, strict=True):
        label = f"{view_schema}.{name}"

        def report(problem: str, label: str = label) -> None:
            problems.append(TrackingProblem(label, problem))

        exists = conn.execute(
            sa.select(sa.func.pg_catalog.to_regclass(_relation(conn, view_schema, name)))
        ).scalar()
        if exists is None:
            report("the view does not exist; create it (create_all / alembic upgrade)")
            continue
        row = stored.get((view_schema, name))
        if row is None or not row.tracked:
            report("it is not tracked: writes to its sources do not mark it stale")
            continue
        rels: list[str] = []
        for source_schema, source_name in _source_names(view):
            rel = conn.execute(_RESOLVE, {"schema": source_schema, "name": source_name}).scalar()
            if rel is None:
                report(f"its source {source_name!r} does not exist")
            else:
                rels.append(str(rel))
        expected = conn.execute(
            sa.text(
                "SELECT ARRAY(SELECT s.rel::oid FROM pg_catalog.unnest("
                f"{quoted}.expand_sources(CAST(:src AS pg_catalog.regclass[]))) AS s(rel))"
            ),
            {"src": rels},
        ).scalar_one()
        if set(expected) != set(row.oids):
            report("it is tracked on other tables than it reads (a source was re-created?)")
        if (view_schema, name) in found:
            report(found[(view_schema, name)])
    return problems


def _relation(conn: Connection, schema: str, name: str) -> str:
    return str(conn.dialect.identifier_preparer.format_table(sa.table(name, schema=schema)))


def check_tracking(
    bind: Engine | Connection | Session, metadata: sa.MetaData
) -> list[TrackingProblem]:
    """The declared ``track_changes=True`` views of ``metadata`` whose tracking is missing
    or broken, one :class:`TrackingProblem` each (empty when all is well).

    Incremental views that exist are checked too: a trigger on a source missing, disabled
    or altered (their writes are not logged). Catches what a restore, a rename or a
    re-created table can leave behind: bookkeeping
    missing, a view not tracked, triggers missing, disabled or carrying other views'
    arguments, a source table dropped or re-created, an inheritance child or a partition
    added without its triggers. ``create_all`` (and ``op.enable_change_tracking``) repair
    all of it. Read-only.

    Example::

        for problem in check_tracking(engine, metadata):
            print(problem.view, problem.problem)
    """
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return _check(conn, metadata)
    if isinstance(bind, Session):
        return _check(bind.connection(), metadata)
    if isinstance(bind, Connection):
        return _check(bind, metadata)
    raise TypeError(
        "check_tracking takes an Engine, a Connection or a Session (for async binds use "
        f"sqlalchemy_matview.asyncio.check_tracking); got {type(bind).__name__}"
    )


# -- refreshing ----------------------------------------------------------------------------------


def refresh_call(
    schema: str,
    name: str,
    *,
    concurrently: bool,
    lock: str = "skip",
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
    tracking_schema_name: str | None = None,
) -> sa.Select[tuple[str]]:
    """``SELECT sqlalchemy_matview.refresh(...)`` for one view.

    The runner executes it; :func:`~sqlalchemy_matview.schedule_refresh` compiles it with
    literal values into a pg_cron job's command. The function takes the view's advisory
    lock (``lock``: ``"skip"``, ``"wait"`` or ``"none"``), returns ``"skipped_locked"`` or,
    with ``only_if_stale``, ``"skipped_fresh"`` when there is nothing to do, and otherwise
    refreshes the view, clears the changes its snapshot covered, records the refresh and
    marks the materialized views reading it stale, returning ``"refreshed"`` or
    ``"refreshed_pending"`` (changes committed during the refresh keep it stale).

    Example::

        status = conn.scalar(refresh_call("public", "mv_daily", concurrently=True))
    """
    return sa.select(
        _refresh_routine(
            "refresh",
            schema,
            name,
            concurrently=concurrently,
            lock=lock,
            only_if_stale=only_if_stale,
            lock_namespace=lock_namespace,
            tracking_schema_name=tracking_schema_name,
        )
    )


def _refresh_routine(
    routine: str,
    schema: str,
    name: str,
    *,
    concurrently: bool,
    lock: str,
    only_if_stale: bool,
    lock_namespace: str | None,
    tracking_schema_name: str | None,
) -> sa.FunctionElement[str]:
    function = getattr(getattr(sa.func, tracking_schema_name or tracking_schema()), routine)
    result: sa.FunctionElement[str] = function(
        sa.literal(schema, sa.Text),
        sa.literal(name, sa.Text),
        sa.literal(lock_key((schema, name), namespace=lock_namespace), sa.BigInteger),
        sa.literal(bool(concurrently), sa.Boolean),
        sa.literal(lock, sa.Text),
        sa.literal(bool(only_if_stale), sa.Boolean),
        type_=sa.Text,
    )
    return result


def refresh_job_call(
    schema: str,
    name: str,
    *,
    concurrently: bool,
    lock: str = "skip",
    only_if_stale: bool = False,
    lock_namespace: str | None = None,
    tracking_schema_name: str | None = None,
) -> sa.FunctionElement[str]:
    r"""``sqlalchemy_matview.refresh_job(...)``, which a pg_cron job ``CALL``\ s.

    A procedure around :func:`refresh_call`'s function: when the refresh fails, it records
    the failure in the history, commits that, and raises the error again (so pg_cron marks
    the run failed). Arguments as for :func:`refresh_call`.
    """
    return _refresh_routine(
        "refresh_job",
        schema,
        name,
        concurrently=concurrently,
        lock=lock,
        only_if_stale=only_if_stale,
        lock_namespace=lock_namespace,
        tracking_schema_name=tracking_schema_name,
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
    tracking_schema_name: str | None = None,
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
        tracking_schema_name=tracking_schema_name,
    )
    return str(conn.execute(call).scalar_one())


def is_lock_wait_timeout(exc: BaseException) -> bool:
    """True for the error of a ``lock="wait"`` refresh that gave up waiting for the lock."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "55P03" and ADVISORY_TIMEOUT_MARK in str(exc)


# -- create_all / drop_all (registered with the declaration layer) ---------------------------------


def _source_names(view: MaterializedView) -> list[tuple[str | None, str]]:
    return [(t.schema, t.name) for t in view.sources if t is not view.table]


def _after_create(views: Sequence[MaterializedView], connection: Connection, **kw: Any) -> None:
    """``create_all``: install, repair or move the tracking of every tracked view that
    exists (``create_all(tables=...)`` may have left some out)."""
    for view in views:
        name = connection.dialect.identifier_preparer.format_table(view.table)
        if connection.execute(sa.select(sa.func.pg_catalog.to_regclass(name))).scalar() is None:
            continue
        install_tracking(
            connection,
            view.schema,
            view.name,
            _source_names(view),
            schema=tracking_schema(view.metadata),
        )


def _before_drop(view: MaterializedView, connection: Connection, **kw: Any) -> None:
    uninstall_tracking(connection, view.schema, view.name, schema=tracking_schema(view.metadata))


register_tracking_hooks(_after_create, _before_drop)

# Kept for callers of 0.1.0's names.
state_tables_exist = bookkeeping_installed
ensure_state_tables = ensure_bookkeeping
LEGACY_TRIGGER_NAME = LEGACY_TRIGGER
