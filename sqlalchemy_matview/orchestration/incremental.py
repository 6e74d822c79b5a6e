"""Incremental views: their table, triggers and dirty-bucket log, and their refresh.

Declared with :class:`~sqlalchemy_matview.Incremental` (the declaration and its checks are in
:mod:`sqlalchemy_matview.incremental`); this module is what ``create_all`` / ``drop_all`` run
for them (through hooks, so that the declaration layer never imports the orchestration) and
what the refresh functions call.

Objects (``S`` is the bookkeeping schema, ``inc_<h>`` the view's prefix, see
:func:`~sqlalchemy_matview.incremental.names_for`):

- the view's table, named as the view, primary key on the key columns;
- ``S.inc_<h>_log``: the dirty-bucket log, the key columns plus the writer's ``xid8``, all of
  them the primary key: writers insert ``ON CONFLICT DO NOTHING`` and never wait on each other
  (two transactions never share an xid);
- ``S.inc_<h>_all``: one row per transaction that truncated a source (everything is dirty);
- ``S.inc_<h>_src<i>()``: the trigger function of source ``i`` (SECURITY DEFINER, pinned
  ``search_path``, EXECUTE revoked from PUBLIC), fired by AFTER ... FOR EACH STATEMENT
  triggers with transition tables (one per event: PostgreSQL allows transition tables on
  single-event triggers only), an AFTER TRUNCATE trigger (ENABLE ALWAYS), and a row-level
  twin ENABLE REPLICA for rows applied by logical replication (which fires no statement
  trigger). A partitioned source gets a row-level trigger instead (PostgreSQL clones it to
  every partition, those created later included, so direct writes into a partition are
  seen) and TRUNCATE triggers on every partition;
- ``S.inc_<h>_refresh(lock_key, lock_mode, only_if_dirty, threshold)``: the refresh.

The refresh, in one transaction under the view's advisory lock: (1) one statement deletes the
log rows its snapshot sees and collects their buckets; (2) when the rows in those buckets
(planner estimates, per source) exceed ``full_refresh_above`` of all rows, or a TRUNCATE was
logged, everything is recomputed instead; (3) one statement recomputes the buckets with the
view's own query, restricted to them (the restriction is pushed into the query, down to an
index on the bucket expression), upserts the rows that changed and deletes the buckets that
came back empty. Statement (3) runs on a snapshot at least as new as (1)'s, so every change
whose log row was consumed is in the result; a change committed in between keeps its log row
for the next refresh. Nothing is truncated and no lock stronger than row locks is taken on the
table: readers never wait, and see the refresh whole or not at all.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import DDLCompiler, IdentifierPreparer
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.util import ClauseAdapter

from ..bookkeeping import CHANNEL, VIEWS_TABLE, tracking_schema
from ..catalog import current_schema
from ..ddl import CommentOnMaterializedView
from ..errors import DefinitionError, MaterializedViewError
from ..incremental import IncrementalNames, names_for, register_incremental_hooks, stored_name
from ..query import query_sql
from ..schema import MaterializedView, unique_key_index_name
from ._sql import CompiledDDL
from .locking import lock_key
from .tracking import ensure_bookkeeping
from .tracking_sql import ADVISORY_TIMEOUT_MARK

__all__ = [
    "IncrementalError",
    "IncrementalState",
    "IncrementalStatus",
    "dirty_views",
    "incremental_problems",
    "incremental_state",
    "is_incremental",
    "refresh_incremental",
    "repair_incremental",
]

log = logging.getLogger("sqlalchemy_matview")

#: The log's column holding the writer's transaction id (a key column may not take it).
XID_COLUMN = "sqlalchemy_matview_xid"
#: Argument types of a view's refresh function.
REFRESH_ARGS = "bigint, text, boolean, double precision"
#: Dirty buckets the full-recompute estimate asks the planner about, at most (per key column).
SAMPLE = 1000
#: The stored table's fill factor (see _after_create).
FILLFACTOR = 50
_TAG = "$sqlalchemy_matview$"
_INNER_TAG = "$sqlalchemy_matview_q$"


def _sql(compiler: DDLCompiler, clause: ClauseElement) -> str:
    """``clause`` compiled for the connection's dialect with its values written in."""
    return query_sql(compiler.dialect, clause)


def _dollar(body: str, tag: str = _TAG) -> str:
    if tag in body:  # pragma: no cover - a definition would have to contain the tag
        raise DefinitionError(f"the SQL of an incremental view contains {tag}; rename what uses it")
    return f"{tag}{body}{tag}"


# -- what the database says ------------------------------------------------------------------

_RELATION = sa.text(
    """
    SELECT c.oid, c.relkind, n.nspname::text AS nspname, c.relname::text AS relname
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = pg_catalog.to_regclass(:name)
    """
)

# Every relation below ``root`` (partitions, sub-partitions, inheritance children).
_DESCENDANTS = sa.text(
    """
    WITH RECURSIVE tree(oid) AS (
        SELECT CAST(:root AS pg_catalog.oid)
      UNION
        SELECT i.inhrelid FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.oid
    )
    SELECT c.oid, c.relkind, n.nspname::text AS nspname, c.relname::text AS relname
      FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE tree.oid <> CAST(:root AS pg_catalog.oid) AND c.relkind IN ('r', 'p')
     ORDER BY n.nspname, c.relname
    """
)


@dataclass(frozen=True)
class _Relation:
    oid: int
    kind: str
    schema: str
    name: str

    def table(self) -> sa.TableClause:
        return sa.table(self.name, schema=self.schema)


def _formatted(conn: Connection, table: sa.Table | sa.TableClause) -> str:
    return str(conn.dialect.identifier_preparer.format_table(table))


def _resolve(conn: Connection, view: MaterializedView, table: sa.Table) -> _Relation:
    row = conn.execute(_RELATION, {"name": _formatted(conn, table)}).first()
    if row is None:
        raise DefinitionError(
            f"incremental view {view._display}: its source {table.fullname!r} does not exist; "
            "create it first"
        )
    if row.relkind not in ("r", "p"):
        raise DefinitionError(
            f"incremental view {view._display}: its source {table.fullname!r} is not a table "
            f"(relkind {row.relkind!r}); triggers can log the writes of tables only, so read "
            "the tables themselves"
        )
    return _Relation(int(row.oid), str(row.relkind), row.nspname, row.relname)


def _view_schema(conn: Connection, view: MaterializedView) -> str:
    return view.schema or current_schema(conn)


def _names(conn: Connection, view: MaterializedView) -> IncrementalNames:
    return names_for(_view_schema(conn, view), view.name)


def _bucket_over(view: MaterializedView, table: sa.Table, alias: str) -> list[ClauseElement]:
    """The bucket expressions of ``table`` rewritten over a relation named ``alias``."""
    assert view.incremental is not None
    adapter = ClauseAdapter(table.alias(alias))
    return [adapter.traverse(e) for e in view.incremental.sources[table]]


# -- create: checks first, then table, log, triggers, refresh function, fill ------------------


def _before_create(view: MaterializedView, conn: Connection) -> None:
    """Check each bucket expression on the server before anything is created: it must be
    IMMUTABLE and must resolve under the triggers' pinned ``search_path``; then check the
    functions the definition calls (:func:`_check_calls`)."""
    assert view.incremental is not None
    for table in view.incremental.sources:
        relation = _resolve(conn, view, table)
        exprs = _bucket_over(view, table, "new_rows")
        with conn.begin_nested() as savepoint:
            try:
                conn.execute(sa.text("SET LOCAL search_path = pg_catalog, pg_temp"))
                conn.execute(_probe_table(relation))
                conn.execute(_probe_index(exprs))
            except DBAPIError as exc:
                savepoint.rollback()
                raise _bucket_error(view, table, exc) from exc
            savepoint.rollback()
    _check_calls(view, conn)


#: The probe view :func:`_check_calls` creates, in the session's temporary schema.
_PROBE_VIEW = "sqlalchemy_matview_probe"

# Every function a view calls (directly, as an aggregate, or as an operator's function) that
# is not IMMUTABLE, read from its stored query tree: pg_depend records no dependency on the
# built-in ones. The tree's text is PostgreSQL's own serialisation of plan nodes, whose
# field names (funcid, aggfnoid, winfnoid, opno) have been stable since 9.x.
_MUTABLE_CALLS = sa.text(
    """
    WITH refs AS (
        SELECT m[1] AS kind, CAST(m[2] AS pg_catalog.oid) AS oid
          FROM pg_catalog.pg_rewrite r,
               pg_catalog.regexp_matches(CAST(r.ev_action AS pg_catalog.text),
                                         ':(funcid|aggfnoid|winfnoid|opno) ([0-9]+)', 'g') AS m
         WHERE r.ev_class OPERATOR(pg_catalog.=) pg_catalog.to_regclass(:probe)
    ), called(fn, operator) AS (
        SELECT oid, CAST(NULL AS pg_catalog.text) FROM refs
         WHERE kind OPERATOR(pg_catalog.<>) 'opno'
      UNION
        SELECT CAST(o.oprcode AS pg_catalog.oid),
               CAST(CAST(o.oid AS pg_catalog.regoperator) AS pg_catalog.text)
          FROM refs JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) refs.oid
         WHERE kind OPERATOR(pg_catalog.=) 'opno'
    )
    SELECT CAST(CAST(p.oid AS pg_catalog.regprocedure) AS pg_catalog.text) AS function,
           pg_catalog.min(called.operator) AS operator,
           CAST(p.provolatile AS pg_catalog.text) AS volatility,
           p.pronamespace OPERATOR(pg_catalog.=) CAST('pg_catalog' AS pg_catalog.regnamespace)
               AS builtin
      FROM called JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) called.fn
     WHERE p.provolatile OPERATOR(pg_catalog.<>) 'i'
     GROUP BY p.oid
     ORDER BY 1
    """
)


def _check_calls(view: MaterializedView, conn: Connection) -> None:
    """Refuse a definition calling a VOLATILE function, or a STABLE one of the user's.

    A refresh recomputes only the buckets whose source rows changed, so a stored bucket must
    be a function of those rows. A VOLATILE function (``random()``, ``clock_timestamp()``, a
    user function left at the default volatility) breaks that outright; a STABLE function of
    the user's may read tables whose writes are logged nowhere, leaving buckets stale with
    nothing in the log. STABLE built-ins are allowed: they depend only on session settings
    (``TimeZone``, ``DateStyle``, ``lc_*``: ``to_char``, ``jsonb_agg``, a ``timestamptz`` to
    ``date``), which a plain materialized view depends on just as much (see
    ``docs/incremental.md``). The server names what the definition calls: it is created as
    a temporary view in a savepoint that is rolled back, and its query tree read.
    """
    with conn.begin_nested() as savepoint:
        conn.execute(
            CompiledDDL(
                lambda c: (
                    f"CREATE TEMPORARY VIEW {c.preparer.quote(_PROBE_VIEW)} AS "
                    + _sql(c, view.definition)
                )
            )
        )
        calls = conn.execute(_MUTABLE_CALLS, {"probe": f"pg_temp.{_PROBE_VIEW}"}).all()
        savepoint.rollback()
    for call in calls:
        if call.volatility == "v" or not call.builtin:
            raise _call_error(view, call.function, call.operator, call.volatility)


def _call_error(
    view: MaterializedView, function: str, operator: str | None, volatility: str
) -> DefinitionError:
    label = f"incremental view {view._display}: the definition calls {function}"
    if operator is not None:
        label += f" (the function of operator {operator})"
    if volatility == "v":
        return DefinitionError(
            f"{label}, which is VOLATILE: its result may change without any write, so a stored "
            "bucket would go stale with nothing in its log. If it depends only on its "
            "arguments, declare it so (ALTER FUNCTION ... IMMUTABLE; a new SQL or PL/pgSQL "
            "function is VOLATILE unless told otherwise); otherwise compute it when reading "
            "the view"
        )
    return DefinitionError(
        f"{label}, which is STABLE: it may read tables whose writes no trigger logs, so a "
        "bucket would go stale with nothing in its log. If it depends only on its arguments, "
        "declare it IMMUTABLE (ALTER FUNCTION ... IMMUTABLE); if it reads a table, join that "
        "table in the definition and map it in sources= instead"
    )


def _probe_table(relation: _Relation) -> CompiledDDL:
    return CompiledDDL(
        lambda c: (
            f"CREATE TEMPORARY TABLE new_rows (LIKE {c.preparer.format_table(relation.table())})"
        )
    )


def _probe_index(exprs: list[ClauseElement]) -> CompiledDDL:
    # PostgreSQL checks that index expressions are IMMUTABLE, with the function it resolves.
    return CompiledDDL(
        lambda c: "CREATE INDEX ON new_rows (" + ", ".join(f"({_sql(c, e)})" for e in exprs) + ")"
    )


def _statistics(bk: str, name: str, relation: _Relation, expr: ClauseElement) -> CompiledDDL:
    return CompiledDDL(
        lambda c: (
            f"CREATE STATISTICS {c.preparer.quote_schema(bk)}.{c.preparer.quote(name)} "
            f"ON ({_sql(c, expr)}) FROM {c.preparer.format_table(relation.table())}"
        )
    )


def _drop_trigger(name: str, member: _Relation) -> CompiledDDL:
    return CompiledDDL(
        lambda c: (
            f"DROP TRIGGER {c.preparer.quote(name)} ON {c.preparer.format_table(member.table())}"
        )
    )


def _drop_statistics(bk: str, name: str) -> CompiledDDL:
    return CompiledDDL(
        lambda c: (
            f"DROP STATISTICS IF EXISTS {c.preparer.quote_schema(bk)}.{c.preparer.quote(name)}"
        )
    )


def _drop_function(bk: str, function: str, args: str = "", cascade: bool = False) -> CompiledDDL:
    return CompiledDDL(
        lambda c: (
            "DROP FUNCTION IF EXISTS "
            f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(function)}({args})"
            + (" CASCADE" if cascade else "")
        )
    )


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def _bucket_error(view: MaterializedView, table: sa.Table, exc: DBAPIError) -> DefinitionError:
    label = f"incremental view {view._display}: the bucket of {table.fullname!r}"
    message = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    code = _sqlstate(exc)
    if code == "42P17":
        return DefinitionError(
            f"{label} is not IMMUTABLE ({message}): a STABLE function such as "
            "date_trunc('day', timestamptz) depends on the session's TimeZone, so writers "
            "could log another bucket than their rows land in; use an immutable form, e.g. "
            'sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date), or date_bin'
        )
    if code in ("42883", "42704", "42P01"):
        return DefinitionError(
            f"{label} does not resolve with search_path = pg_catalog, pg_temp, which its "
            f"trigger runs with ({message}); qualify your functions and types with their "
            "schema (sa.func.myschema.f(...))"
        )
    return DefinitionError(f"{label} is refused by the server: {message}")


def _after_create(view: MaterializedView, conn: Connection) -> None:
    assert view.incremental is not None
    inc = view.incremental
    bk = tracking_schema(view.metadata)
    ensure_bookkeeping(conn, bk)
    names = _names(conn, view)
    view_schema = _view_schema(conn, view)
    # A realtime view's rows live next to it, under another name.
    stored = stored_name(view.name) if inc.realtime else view.name
    target = sa.table(stored, schema=view_schema)
    key = list(inc.key)
    columns = [c.name for c in view.table.c]
    for k in key:
        if k == XID_COLUMN:  # pragma: no cover - nobody names a column so
            raise DefinitionError(f"incremental view {view._display}: rename column {k!r}")

    def q(c: DDLCompiler, name: str) -> str:
        return str(c.preparer.quote(name))

    def in_bk(c: DDLCompiler, name: str) -> str:
        return f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(name)}"

    def tbl(c: DDLCompiler) -> str:
        return str(c.preparer.format_table(target))

    def run(build: Callable[[DDLCompiler], str]) -> None:
        conn.execute(CompiledDDL(build))

    run(
        lambda c: (
            f"ALTER TABLE {tbl(c)} ADD CONSTRAINT "
            f"{q(c, unique_key_index_name(view.name))} PRIMARY KEY ("
            + ", ".join(q(c, k) for k in key)
            + ")"
        )
    )
    # Room on every page for a new version of each of its rows: a full recompute that
    # changes every row then updates in place (HOT: no index entry, no page elsewhere),
    # and the space of the versions before is reclaimed by the next refresh's own reads.
    run(lambda c: f"ALTER TABLE {tbl(c)} SET (fillfactor = {FILLFACTOR})")
    # The log's key columns get the table's exact types.
    run(
        lambda c: (
            f"CREATE TABLE {in_bk(c, names.log)} AS SELECT "
            + ", ".join(q(c, k) for k in key)
            + f" FROM {tbl(c)} WITH NO DATA"
        )
    )
    run(
        lambda c: (
            f"ALTER TABLE {in_bk(c, names.log)} ADD COLUMN {q(c, XID_COLUMN)} "
            "pg_catalog.xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(), "
            "ADD PRIMARY KEY (" + ", ".join(q(c, k) for k in [*key, XID_COLUMN]) + ")"
        )
    )
    run(
        lambda c: (
            f"CREATE TABLE {in_bk(c, names.whole)} ({q(c, XID_COLUMN)} pg_catalog.xid8 "
            "PRIMARY KEY DEFAULT pg_catalog.pg_current_xact_id())"
        )
    )
    # The writers' barrier (see _notify): a random key, so that no other user of advisory
    # locks holds it by chance.
    barrier = secrets.randbits(63)
    for index, table in enumerate(inc.sources):
        _install_source(conn, view, names, bk, index, table, key, barrier)
    _create_leaves(conn, view, names, bk)
    _create_refresh_function(conn, view, names, bk, target, key, columns, barrier)
    # After CREATE TRIGGER, in its transaction: its SHARE ROW EXCLUSIVE lock on each source
    # keeps writers out until this commits, so no write falls between fill and log.
    try:
        with conn.begin_nested():
            run(
                lambda c: (
                    f"INSERT INTO {tbl(c)} ("
                    + ", ".join(q(c, n) for n in columns)
                    + f") SELECT d.* FROM ({_sql(c, view.definition)}) AS d WHERE "
                    + " AND ".join(f"d.{q(c, k)} IS NOT NULL" for k in key)
                )
            )
    except sa.exc.IntegrityError as exc:
        if _sqlstate(exc) == "23502":
            raise DefinitionError(
                f"incremental view {view._display}: the definition returns a row whose key "
                f"({', '.join(key)}) is NULL, which the table's primary key refuses; filter "
                "those rows out (.where(<bucket> IS NOT NULL)) or coalesce the bucket"
            ) from exc
        raise
    if inc.realtime:
        conn.execute(_realtime_view(view, names, bk, target, key, columns))
    if view.comment is not None:
        conn.execute(CommentOnMaterializedView(view))
    log.info("incremental view %s.%s created and filled", view_schema, view.name)


def _leaves_select(c: DDLCompiler, roots: list[_Relation], into: str) -> str:
    """PL/pgSQL: the relations holding the rows of ``roots`` (partitions and children, not
    partitioned parents), and their files, as two arrays ordered by OID, ``INTO`` ``into``.

    By name, not OID: a restore renumbers relations (and then every leaf is new).
    """
    literal = c.sql_compiler.render_literal_value
    regclasses = ", ".join(
        f"pg_catalog.to_regclass({literal(str(c.preparer.format_table(r.table())), sa.String())})"
        for r in roots
    )
    return f"""WITH RECURSIVE tree(rel) AS (
        SELECT r.rel FROM pg_catalog.unnest(ARRAY[{regclasses}]::pg_catalog.oid[]) AS r(rel)
         WHERE r.rel IS NOT NULL
        UNION
        SELECT i.inhrelid FROM pg_catalog.pg_inherits i
          JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.rel
    )
    SELECT COALESCE(pg_catalog.array_agg(c.oid ORDER BY c.oid), '{{}}'),
           COALESCE(pg_catalog.array_agg(c.relfilenode ORDER BY c.oid), '{{}}')
      INTO {into}
      FROM pg_catalog.pg_class c JOIN tree t ON c.oid OPERATOR(pg_catalog.=) t.rel
     WHERE c.relkind OPERATOR(pg_catalog.<>) 'p';"""


def _create_leaves(
    conn: Connection, view: MaterializedView, names: IncrementalNames, bk: str
) -> None:
    """The leaves of the sources' trees as the fill saw them, and ``reshaped()``.

    No trigger fires when a partition is attached (its rows appear), detached or dropped
    (they vanish), or when a partition created after the view, which has no TRUNCATE trigger
    (statement triggers are not cloned), is truncated. The refresh compares the relations
    holding the sources' rows, with their files (a TRUNCATE or a rewrite gives a new one),
    with those it last saw: a leaf gone or rewritten, or a new one holding rows, means
    everything is recomputed. (A new empty partition, as created ahead of time, does not.)
    """
    assert view.incremental is not None
    roots = [_resolve(conn, view, t) for t in view.incremental.sources]
    realtime = view.incremental.realtime

    def build(c: DDLCompiler) -> str:
        s = c.preparer.quote_schema(bk)
        leaves = f"{s}.{c.preparer.quote(names.leaves)}"
        body = f"""
DECLARE
    _was_rels pg_catalog.oid[];
    _was_files pg_catalog.oid[];
    _leaf pg_catalog.oid;
    _rows boolean;
BEGIN
    {_leaves_select(c, roots, 'rels, files')}
    SELECT l.rels, l.files INTO _was_rels, _was_files FROM {leaves} AS l;
    changed := rels IS DISTINCT FROM _was_rels OR files IS DISTINCT FROM _was_files;
    reshaped := false;
    IF NOT changed THEN
        RETURN;
    END IF;
    -- A leaf detached or dropped (its rows vanished), or given a new file (TRUNCATE without
    -- a trigger of ours, VACUUM FULL, a rewriting ALTER TABLE).
    IF EXISTS (
        SELECT 1 FROM ROWS FROM (pg_catalog.unnest(_was_rels), pg_catalog.unnest(_was_files))
               AS w(rel, file)
         WHERE NOT EXISTS (
            SELECT 1 FROM ROWS FROM (pg_catalog.unnest(rels), pg_catalog.unnest(files))
                          AS n(rel, file)
             WHERE n.rel OPERATOR(pg_catalog.=) w.rel
               AND n.file OPERATOR(pg_catalog.=) w.file)
    ) THEN
        reshaped := true;
        RETURN;
    END IF;
    -- A new leaf: attached with its rows, or created (empty; its writes are logged since).
    FOR _leaf IN
        SELECT n.rel FROM pg_catalog.unnest(rels) AS n(rel)
         WHERE n.rel OPERATOR(pg_catalog.<>) ALL (COALESCE(_was_rels, '{{}}'))
    LOOP
        BEGIN
            EXECUTE 'SELECT EXISTS (SELECT 1 FROM '
                    || _leaf::pg_catalog.regclass::pg_catalog.text || ')' INTO _rows;
        EXCEPTION WHEN insufficient_privilege THEN
            _rows := true;
        END;
        IF _rows THEN
            reshaped := true;
            RETURN;
        END IF;
    END LOOP;
END
"""
        return (
            f"CREATE FUNCTION {s}.{c.preparer.quote(names.reshaped)}(OUT changed boolean, "
            "OUT reshaped boolean, OUT rels pg_catalog.oid[], OUT files pg_catalog.oid[]) "
            "LANGUAGE plpgsql STABLE SECURITY DEFINER "
            f"SET search_path = pg_catalog, pg_temp AS {_dollar(body)}"
        )

    def in_bk(c: DDLCompiler, name: str) -> str:
        return f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(name)}"

    conn.execute(
        CompiledDDL(
            lambda c: (
                f"CREATE TABLE {in_bk(c, names.leaves)} (rels pg_catalog.oid[] NOT NULL, "
                "files pg_catalog.oid[] NOT NULL)"
            )
        )
    )
    conn.execute(CompiledDDL(build))
    # Readers of a realtime view call it (as themselves): it answers a yes or no, as its
    # owner, about relations whose rows they read through the view.
    grant = "GRANT EXECUTE" if realtime else "REVOKE ALL"
    to = "TO" if realtime else "FROM"
    conn.execute(
        CompiledDDL(lambda c: f"{grant} ON FUNCTION {in_bk(c, names.reshaped)}() {to} PUBLIC")
    )
    conn.execute(
        CompiledDDL(
            lambda c: (
                f"INSERT INTO {in_bk(c, names.leaves)} (rels, files) "
                f"SELECT r.rels, r.files FROM {in_bk(c, names.reshaped)}() AS r"
            )
        )
    )


def _realtime_view(
    view: MaterializedView,
    names: IncrementalNames,
    bk: str,
    stored: sa.TableClause,
    key: list[str],
    columns: list[str],
) -> CompiledDDL:
    """The view a realtime incremental view is: stored rows of clean buckets, and the dirty
    buckets computed live, all in the reader's snapshot (so always exact)."""

    def build(c: DDLCompiler) -> str:
        q = c.preparer.quote
        log_table = f"{c.preparer.quote_schema(bk)}.{q(names.log)}"
        # Everything is computed live after a TRUNCATE, or once partitions changed.
        everything = (
            f"(EXISTS (SELECT 1 FROM {c.preparer.quote_schema(bk)}.{q(names.whole)})"
            f" OR (SELECT r.reshaped FROM {c.preparer.quote_schema(bk)}.{q(names.reshaped)}()"
            " AS r))"
        )
        definition = _sql(c, view.definition)
        same = " AND ".join(f"l.{q(k)} = s.{q(k)}" for k in key)
        # Each key column's dirty values as an array: a parameter the planner pushes into
        # the definition, down to an index on the bucket (a join to the log would not be).
        dirty = " AND ".join(
            f"d.{q(k)} = ANY (ARRAY(SELECT l.{q(k)} FROM {log_table} AS l))" for k in key
        )
        if len(key) > 1:
            tuple_ = ", ".join(f"d.{q(k)}" for k in key)
            logged = ", ".join(f"l.{q(k)}" for k in key)
            dirty += f" AND ({tuple_}) IN (SELECT {logged} FROM {log_table} AS l)"
        not_null = " AND ".join(f"d.{q(k)} IS NOT NULL" for k in key)
        d_cols = ", ".join(f"d.{q(n)}" for n in columns)
        s_cols = ", ".join(f"s.{q(n)}" for n in columns)
        return (
            f"CREATE VIEW {c.preparer.format_table(view.table)} ("
            + ", ".join(q(n) for n in columns)
            + f") AS SELECT {s_cols} FROM {c.preparer.format_table(stored)} AS s"
            f" WHERE NOT {everything}"
            f" AND NOT EXISTS (SELECT 1 FROM {log_table} AS l WHERE {same})"
            f" UNION ALL SELECT {d_cols} FROM ({definition}) AS d"
            f" WHERE {everything} AND {not_null}"
            f" UNION ALL SELECT {d_cols} FROM ({definition}) AS d"
            f" WHERE NOT {everything} AND {dirty}"
        )

    return CompiledDDL(build)


def _install_source(
    conn: Connection,
    view: MaterializedView,
    names: IncrementalNames,
    bk: str,
    index: int,
    table: sa.Table,
    key: list[str],
    barrier: int,
) -> None:
    relation = _resolve(conn, view, table)
    function = names.trigger_function(index)
    payload = f"{_view_schema(conn, view)}.{view.name}"
    statement_exprs = {
        alias: _bucket_over(view, table, alias) for alias in ("new_rows", "old_rows")
    }

    def build(c: DDLCompiler) -> str:
        log_table = f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(names.log)}"
        whole = f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(names.whole)}"
        cols = ", ".join(c.preparer.quote(k) for k in key)

        def log_from(sources: list[str], distinct: bool, skip_logged: bool) -> str:
            selects = []
            for alias in sources:
                exprs = [_sql(c, e) for e in statement_exprs[alias]]
                rel = alias if distinct else f"(SELECT {alias[:3].upper()}.*) AS {alias}"
                where = " AND ".join(f"({e}) IS NOT NULL" for e in exprs)
                selects.append(f"SELECT {', '.join(exprs)} FROM {rel} WHERE {where}")
            body = " UNION ".join(selects) if distinct else " UNION ALL ".join(selects)
            keyword = "DISTINCT " if distinct and len(selects) == 1 else ""
            aliases = ", ".join(f"b{i}" for i in range(len(key)))
            logged = ""
            if skip_logged:
                same = " AND ".join(f"l.{c.preparer.quote(k)} = b.b{i}" for i, k in enumerate(key))
                logged = f" WHERE NOT EXISTS (SELECT 1 FROM {log_table} AS l WHERE {same})"
            return (
                f"INSERT INTO {log_table} ({cols}) SELECT {keyword}b.* FROM ({body}) "
                f"AS b({aliases}){logged} ON CONFLICT DO NOTHING;"
            )

        def log_all(skip_logged: bool) -> str:
            return f"""IF TG_LEVEL = 'ROW' THEN
            IF TG_OP = 'INSERT' THEN
                {log_from(["new_rows"], False, skip_logged)}
            ELSIF TG_OP = 'DELETE' THEN
                {log_from(["old_rows"], False, skip_logged)}
            ELSE
                {log_from(["old_rows", "new_rows"], False, skip_logged)}
            END IF;
        ELSIF TG_OP = 'INSERT' THEN
            {log_from(["new_rows"], True, skip_logged)}
        ELSIF TG_OP = 'DELETE' THEN
            {log_from(["old_rows"], True, skip_logged)}
        ELSE
            {log_from(["old_rows", "new_rows"], True, skip_logged)}
        END IF;"""

        channel = c.sql_compiler.render_literal_value(CHANNEL, sa.String())
        notify = f"PERFORM pg_catalog.pg_notify({channel}, "
        notify += f"{c.sql_compiler.render_literal_value(payload, sa.String())});"
        body = f"""
DECLARE
    _logged bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {whole} DEFAULT VALUES ON CONFLICT DO NOTHING;
        {notify}
        RETURN NULL;
    END IF;
    -- Under READ COMMITTED, holding the barrier shared until commit: a refresh takes it
    -- exclusively before its snapshot, so a refresh that will consume a log row this
    -- statement sees waits for this transaction and sees its changes too. A bucket already
    -- logged then needs no row of ours (the steady state of a hot bucket writes nothing).
    -- Without the barrier (a refresh is starting or running), or with snapshots that may
    -- not show a refresh's deletions, every bucket is logged.
    IF pg_catalog.current_setting('transaction_isolation') = 'read committed'
       AND pg_catalog.pg_try_advisory_xact_lock_shared({barrier}) THEN
        {log_all(True)}
    ELSE
        {log_all(False)}
    END IF;
    -- Wake the workers when a bucket was newly logged: a writer that logged nothing is
    -- covered by the refresh that the bucket's writer woke. (NOTIFY queues committing
    -- writers on one lock: the steady state sends none. Correctness never rests on it.)
    GET DIAGNOSTICS _logged = ROW_COUNT;
    IF _logged > 0 THEN
        {notify}
    END IF;
    RETURN NULL;
END
"""
        return (
            f"CREATE FUNCTION {c.preparer.quote_schema(bk)}.{c.preparer.quote(function)}() "
            "RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
            f"SET search_path = pg_catalog, pg_temp AS {_dollar(body)}"
        )

    conn.execute(CompiledDDL(build))
    conn.execute(
        CompiledDDL(
            lambda c: (
                "REVOKE ALL ON FUNCTION "
                f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(function)}() FROM PUBLIC"
            )
        )
    )
    # Statistics on each bucket expression: the planner then estimates how many rows the
    # dirty buckets hold (the full-recompute threshold) even without an index on it.
    # (A plain column has statistics of its own.)
    assert view.incremental is not None
    declared = view.incremental.sources[table]
    for position, expr in enumerate(_bucket_over(view, table, relation.name)):
        if not isinstance(declared[position], sa.Column):
            conn.execute(_statistics(bk, names.statistics(index, position), relation, expr))
    for member, name, event, level, enable in _wanted_triggers(conn, names, index, relation):
        _create_trigger(conn, name, member, event, level, enable, bk, function)


def _wanted_triggers(
    conn: Connection, names: IncrementalNames, index: int, relation: _Relation
) -> list[tuple[_Relation, str, str, str, str]]:
    """``(relation, trigger name, event clause, level, enable)`` of every trigger source
    ``index`` needs now, on it and on every partition or inheritance child it has."""
    members = [relation]
    members += [
        _Relation(int(r.oid), str(r.relkind), r.nspname, r.relname)
        for r in conn.execute(_DESCENDANTS, {"root": relation.oid})
    ]
    return [
        (member, names.trigger(f"{index}_{suffix}"), event, level, enable)
        for member in members
        for suffix, event, level, enable in _triggers_for(relation, member)
    ]


_ENABLED = {"ORIGIN": "O", "ALWAYS": "A", "REPLICA": "R"}

_TRIGGER = sa.text(
    """
    SELECT t.tgenabled::text AS enabled,
           t.tgfoid = pg_catalog.to_regprocedure(:function) AS ours
      FROM pg_catalog.pg_trigger t
     WHERE t.tgrelid = CAST(:rel AS pg_catalog.oid) AND t.tgname = :name
    """
)


def incremental_problems(conn: Connection, view: MaterializedView) -> list[str]:
    """What is wrong with an existing incremental view's logging, in words an operator can
    act on (empty when all is well): a missing refresh function or log, a trigger missing,
    disabled or altered (a source re-created, a partition or child table added with no
    TRUNCATE trigger, ``ALTER TABLE ... DISABLE TRIGGER``): writes there are not logged.

    ``create_all`` repairs them (:func:`repair_incremental`); ``check_tracking`` and
    ``matview check`` report them.
    """
    assert view.incremental is not None
    bk = tracking_schema(view.metadata)
    names = _names(conn, view)
    preparer = conn.dialect.identifier_preparer
    problems: list[str] = []
    if not is_incremental(conn, _view_schema(conn, view), view.name, bk):
        return ["its refresh function is missing; drop and create the view again"]
    for index, table in enumerate(view.incremental.sources):
        try:
            relation = _resolve(conn, view, table)
        except DefinitionError as exc:
            problems.append(str(exc))
            continue
        function = f"{preparer.quote_schema(bk)}.{preparer.quote(names.trigger_function(index))}()"
        for member, name, _event, _level, enable in _wanted_triggers(conn, names, index, relation):
            row = conn.execute(
                _TRIGGER, {"rel": member.oid, "name": name, "function": function}
            ).first()
            if row is None or not row.ours or row.enabled != _ENABLED[enable]:
                problems.append(
                    f"trigger {name} on {member.schema}.{member.name} is missing, disabled or "
                    "altered: writes there are not logged; run metadata.create_all() to "
                    "repair it (the next refresh then recomputes everything)"
                )
    return problems


def repair_incremental(conn: Connection, view: MaterializedView) -> bool:
    """Create the triggers an existing incremental view is missing (and enable altered ones
    again); True when something was repaired. Writes made meanwhile were not logged, so the
    view is marked as truncated: its next refresh recomputes everything. ``create_all`` runs
    it for every incremental view that exists already.
    """
    assert view.incremental is not None
    if not incremental_problems(conn, view):
        return False
    bk = tracking_schema(view.metadata)
    names = _names(conn, view)
    if not is_incremental(conn, _view_schema(conn, view), view.name, bk):
        return False  # nothing to repair from: the view must be created again
    preparer = conn.dialect.identifier_preparer
    for index, table in enumerate(view.incremental.sources):
        relation = _resolve(conn, view, table)
        function_name = names.trigger_function(index)
        function = f"{preparer.quote_schema(bk)}.{preparer.quote(function_name)}()"
        for member, name, event, level, enable in _wanted_triggers(conn, names, index, relation):
            row = conn.execute(
                _TRIGGER, {"rel": member.oid, "name": name, "function": function}
            ).first()
            if row is not None and row.ours and row.enabled == _ENABLED[enable]:
                continue
            if row is not None:
                conn.execute(_drop_trigger(name, member))
            _create_trigger(conn, name, member, event, level, enable, bk, function_name)
    conn.execute(
        _Query(
            f"INSERT INTO {preparer.quote_schema(bk)}.{preparer.quote(names.whole)} "
            "DEFAULT VALUES ON CONFLICT DO NOTHING"
        )
    )
    log.warning(
        "incremental view %s: triggers repaired; its next refresh recomputes everything",
        view.fullname,
    )
    return True


def _triggers_for(root: _Relation, member: _Relation) -> list[tuple[str, str, str, str]]:
    """``(suffix, event clause, level, enable)`` of the triggers ``member`` needs."""
    if root.kind == "p":
        # Row-level on the partitioned root (cloned to every partition, later ones too);
        # TRUNCATE of a partition fires only that partition's own statement trigger.
        wanted = [("trunc", "AFTER TRUNCATE", "STATEMENT", "ALWAYS")]
        if member.oid == root.oid:
            wanted.append(("row", "AFTER INSERT OR UPDATE OR DELETE", "ROW", "ALWAYS"))
        return wanted
    if member.kind != "r":
        return []
    return [
        ("ins", "AFTER INSERT|REFERENCING NEW TABLE AS new_rows", "STATEMENT", "ORIGIN"),
        (
            "upd",
            "AFTER UPDATE|REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
            "STATEMENT",
            "ORIGIN",
        ),
        ("del", "AFTER DELETE|REFERENCING OLD TABLE AS old_rows", "STATEMENT", "ORIGIN"),
        ("trunc", "AFTER TRUNCATE", "STATEMENT", "ALWAYS"),
        # Logical replication applies rows with session_replication_role = replica, which
        # fires no statement trigger: this twin fires only then.
        ("repl", "AFTER INSERT OR UPDATE OR DELETE", "ROW", "REPLICA"),
    ]


def _create_trigger(
    conn: Connection,
    name: str,
    member: _Relation,
    event: str,
    level: str,
    enable: str,
    bk: str,
    function: str,
) -> None:
    timing, _, referencing = event.partition("|")

    def create(c: DDLCompiler) -> str:
        return (
            f"CREATE TRIGGER {c.preparer.quote(name)} {timing} ON "
            f"{c.preparer.format_table(member.table())} {referencing} FOR EACH {level} "
            "EXECUTE FUNCTION "
            f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(function)}()"
        )

    conn.execute(CompiledDDL(create))
    if enable != "ORIGIN":
        conn.execute(
            CompiledDDL(
                lambda c: (
                    f"ALTER TABLE {c.preparer.format_table(member.table())} ENABLE "
                    f"{enable} TRIGGER {c.preparer.quote(name)}"
                )
            )
        )


def _row_differs(q: Callable[[str], str], columns: list[str], old: str, new: str) -> str:
    """``old``'s ``columns`` differ from ``new``'s, compared as text: every type has a text
    form, not every type an equality operator."""
    row_old = ", ".join(f"{old}.{q(n)}" for n in columns)
    row_new = ", ".join(f"{new}.{q(n)}" for n in columns)
    return f"ROW({row_old})::text IS DISTINCT FROM ROW({row_new})::text"


def _create_refresh_function(
    conn: Connection,
    view: MaterializedView,
    names: IncrementalNames,
    bk: str,
    target: sa.TableClause,
    key: list[str],
    columns: list[str],
    barrier: int,
) -> None:
    assert view.incremental is not None
    inc = view.incremental
    types = {
        r.attname: r.type
        for r in conn.execute(
            sa.text(
                "SELECT a.attname::text AS attname,"
                " pg_catalog.format_type(a.atttypid, a.atttypmod) AS type"
                " FROM pg_catalog.pg_attribute a"
                " WHERE a.attrelid = pg_catalog.to_regclass(:t) AND a.attnum > 0"
                " AND NOT a.attisdropped"
            ),
            {"t": _formatted(conn, target)},
        )
    }
    sources = [(_resolve(conn, view, t), _bucket_over(view, t, "src")) for t in inc.sources]
    view_schema = target.schema or ""
    # The definition names what it reads as the creating session resolved it: the function
    # resolves it through the same schemas (after pg_catalog, so that nothing in them can
    # stand in for a built-in), whoever's session runs the refresh.
    path = list(conn.execute(sa.text("SELECT pg_catalog.current_schemas(false)")).scalar_one())
    has_merge = (conn.dialect.server_version_info or (15,)) >= (15,)

    def build(c: DDLCompiler) -> str:
        q = c.preparer.quote
        s = c.preparer.quote_schema(bk)
        tbl = c.preparer.format_table(target)
        log_table = f"{s}.{q(names.log)}"
        whole = f"{s}.{q(names.whole)}"
        leaves = f"{s}.{q(names.leaves)}"
        reshaped = f"{s}.{q(names.reshaped)}"

        def lit(value: str) -> str:
            return str(c.sql_compiler.render_literal_value(value, sa.String()))

        arrays = [f"_a{i}" for i in range(len(key))]
        declare = "\n".join(
            f"    {a} {types[k]}[];\n    _s{i} {types[k]}[];"
            for i, (a, k) in enumerate(zip(arrays, key, strict=True))
        )
        collect = ", ".join(f"pg_catalog.array_agg(DISTINCT g.{q(k)})" for k in key)
        # One key column: its array is already distinct (counting it again sorted every
        # key a second time: 12 ms for 50,000 keys).
        count_buckets = (
            f"pg_catalog.cardinality({arrays[0]})"
            if len(key) == 1
            else "pg_catalog.count(DISTINCT ("
            + ", ".join(f"g.{q(k)}" for k in key)
            + "))"
        )
        if len(key) == 1:
            consume = (
                f"{collect} INTO {arrays[0]} FROM g;\n"
                f"    buckets := COALESCE({count_buckets}, 0);"
            )
        else:
            consume = f"{collect}, {count_buckets} INTO {', '.join(arrays)}, buckets FROM g;"
        samples = [f"_s{i}" for i in range(len(key))]
        # The planner adds up the rows of each value of "= ANY (array)", at a cost that grows
        # with the array (30 ms for 50,000 keys): past SAMPLE values, every k-th of them
        # (sorted: spread over the whole range), the sum scaled by k, costs a bounded time.
        estimates = [
            f"""
        _step := GREATEST(1, pg_catalog.ceil(pg_catalog.cardinality({a}) / {SAMPLE}.0))::int;
        {s_} := CASE WHEN _step = 1 THEN {a} ELSE ARRAY(
            SELECT u.v FROM pg_catalog.unnest({a}) WITH ORDINALITY AS u(v, n)
             WHERE pg_catalog.mod(u.n, _step) = 0) END;
        _scale := _scale * pg_catalog.cardinality({a}) / pg_catalog.cardinality({s_});"""
            for a, s_ in zip(arrays, samples, strict=True)
        ]
        for relation, exprs in sources:
            source = c.preparer.format_table(relation.table())
            cond = " AND ".join(
                f"({_sql(c, e)}) OPERATOR(pg_catalog.=) ANY (${i + 1})" for i, e in enumerate(exprs)
            )
            using = ", ".join(samples)
            estimates.append(
                f"""
        EXECUTE {
                    _dollar(
                        f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {source} AS src WHERE {cond}",
                        _INNER_TAG,
                    )
                } INTO _plan USING {using};
        _dirty_rows := _dirty_rows + _scale * (_plan -> 0 -> 'Plan' ->> 'Plan Rows')::float8;
        EXECUTE {_dollar(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {source} AS src", _INNER_TAG)}
           INTO _plan;
        _total_rows := _total_rows + (_plan -> 0 -> 'Plan' ->> 'Plan Rows')::float8;"""
            )
        definition = _sql(c, view.definition)
        cols = ", ".join(q(n) for n in columns)
        fcols = ", ".join(f"f.{q(n)}" for n in columns)
        others = [n for n in columns if n not in key]
        on_key = ", ".join(q(k) for k in key)
        if others:
            conflict = (
                f"ON CONFLICT ({on_key}) DO UPDATE SET "
                + ", ".join(f"{q(n)} = EXCLUDED.{q(n)}" for n in others)
                + f" WHERE {_row_differs(q, others, 'v', 'EXCLUDED')}"
            )
        else:
            conflict = f"ON CONFLICT ({on_key}) DO NOTHING"
        same_key = " AND ".join(f"f.{q(k)} = v.{q(k)}" for k in key)
        # A group whose key is NULL is not stored (a primary key cannot hold it), and rows
        # whose bucket is NULL are not logged.
        not_null = " AND ".join(f"d.{q(k)} IS NOT NULL" for k in key)
        restrict_d = " AND ".join(f"d.{q(k)} = ANY ({a})" for k, a in zip(key, arrays, strict=True))
        restrict_v = " AND ".join(f"v.{q(k)} = ANY ({a})" for k, a in zip(key, arrays, strict=True))

        # The dirty buckets: upserted where they changed, deleted where they came back empty.
        recompute = f"""
        WITH fresh AS MATERIALIZED (
            SELECT d.* FROM ({definition}) AS d WHERE {restrict_d}
        ), upserted AS (
            INSERT INTO {tbl} AS v ({cols}) SELECT {fcols} FROM fresh AS f {conflict}
            RETURNING 1
        ), removed AS (
            DELETE FROM {tbl} AS v
             WHERE {restrict_v} AND NOT EXISTS (SELECT 1 FROM fresh AS f WHERE {same_key})
            RETURNING 1
        )
        -- (Data-modifying CTEs run whatever the query reads; this one says how much.)
        SELECT (SELECT pg_catalog.count(*) FROM upserted)
               + (SELECT pg_catalog.count(*) FROM removed) INTO _changed;"""

        # Everything: one pass over the definition, writing only the rows that changed. A
        # MERGE joins it to the table once (an upsert probed the key of every row: 1.8x a
        # plain REFRESH with every key changed; DELETE + INSERT wrote every row twice and
        # every index entry again: 1.4-1.6x); with the table's free space (FILLFACTOR) the
        # updates are HOT. Rows gone from the definition go in the same statement.
        # (PostgreSQL 13 and 14 have no MERGE: they delete and insert everything.)
        fset = ", ".join(f"{q(n)} = f.{q(n)}" for n in others)
        vcols = ", ".join(f"f.{q(n)}" for n in columns)
        changed = (
            f"\n        WHEN MATCHED AND {_row_differs(q, others, 'v', 'f')} THEN UPDATE SET {fset}"
            if others
            else ""
        )
        replace_all = f"""
        WITH fresh AS MATERIALIZED (
            SELECT d.* FROM ({definition}) AS d WHERE {not_null}
        ), removed AS (
            DELETE FROM {tbl} AS v WHERE NOT EXISTS (SELECT 1 FROM fresh AS f WHERE {same_key})
        )
        MERGE INTO {tbl} AS v USING fresh AS f ON {same_key}{changed}
        WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({vcols});"""
        if not has_merge:
            dcols = ", ".join(f"d.{q(n)}" for n in columns)
            replace_all = f"""
        DELETE FROM {tbl};
        INSERT INTO {tbl} ({cols}) SELECT {dcols} FROM ({definition}) AS d WHERE {not_null};"""

        lock_mark = lit(f"{ADVISORY_TIMEOUT_MARK} ")
        body = f"""
#variable_conflict use_column
DECLARE
{declare}
    _whole boolean;
    _plan json;
    _dirty_rows float8 := 0;
    _total_rows float8 := 0;
    _scale float8 := 1;
    _step integer;
    _changed bigint;
    _started timestamptz := pg_catalog.clock_timestamp();
    _spent float8;
    _saved_timeout text;
    _saved_mode text;
    _degraded boolean := false;
    _rels pg_catalog.oid[];
    _files pg_catalog.oid[];
    _reshaped boolean;
BEGIN
    buckets := 0;
    full_refresh := false;
    IF lock_mode = 'skip' THEN
        IF NOT pg_catalog.pg_try_advisory_xact_lock(lock_key) THEN
            status := 'skipped_locked';
            RETURN;
        END IF;
    ELSIF lock_mode = 'wait' THEN
        BEGIN
            PERFORM pg_catalog.pg_advisory_xact_lock(lock_key);
        EXCEPTION WHEN lock_not_available THEN
            RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
                MESSAGE = {lock_mark} || {lit(f"{view_schema}.{view.name}")},
                HINT = 'another process is refreshing it; raise lock_timeout or skip it';
        END;
    ELSIF lock_mode IS DISTINCT FROM 'none' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'lock_mode ' || pg_catalog.quote_nullable(lock_mode)
                      || ': pass skip, wait or none';
    END IF;
    -- Writers leave a bucket already logged to the refresh that consumes that row, which
    -- waits for them (the barrier) before its snapshot: an older snapshot would miss them.
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_transaction_state',
            MESSAGE = 'incremental view ' || {lit(f"{view_schema}.{view.name}")}
                      || ' must be refreshed in a READ COMMITTED transaction, not '
                      || pg_catalog.current_setting('transaction_isolation'),
            HINT = 'refresh it with refresh_views(engine, view), or from a READ COMMITTED '
                   'transaction';
    END IF;
    -- Partitions attached, detached or dropped since the last refresh (no trigger fires).
    -- (The same leaves: no call of reshaped(), a tenth of a 1-row refresh.)
    {_leaves_select(c, [r for r, _ in sources], '_rels, _files')}
    IF EXISTS (SELECT 1 FROM {leaves} AS l
                WHERE l.rels OPERATOR(pg_catalog.=) _rels
                  AND l.files OPERATOR(pg_catalog.=) _files) THEN
        _reshaped := false;
    ELSE
        SELECT r.reshaped INTO _reshaped FROM {reshaped}() AS r;
        UPDATE {leaves} SET rels = _rels, files = _files;
        IF NOT FOUND THEN
            INSERT INTO {leaves} (rels, files) VALUES (_rels, _files);
        END IF;
    END IF;
    IF only_if_dirty AND NOT _reshaped AND NOT EXISTS (SELECT 1 FROM {log_table})
       AND NOT EXISTS (SELECT 1 FROM {whole}) THEN
        status := 'skipped_fresh';
        RETURN;
    END IF;
    -- Writers that hold the barrier (shared, until they commit) may have left notifying to
    -- an earlier writer: wait for them, so that the snapshots below see them.
    _saved_timeout := pg_catalog.current_setting('lock_timeout');
    IF _saved_timeout = '0' THEN
        PERFORM pg_catalog.set_config('lock_timeout', '60s', true);
    END IF;
    BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock({barrier});
    EXCEPTION WHEN lock_not_available THEN
        _degraded := true;
    END;
    PERFORM pg_catalog.set_config('lock_timeout', _saved_timeout, true);
    -- Consumed: the log rows this statement's snapshot sees. The recompute below runs on
    -- a later snapshot, so it sees at least these changes.
    WITH gone AS (DELETE FROM {whole} RETURNING 1)
    SELECT pg_catalog.count(*) > 0 OR _reshaped INTO _whole FROM gone;
    WITH g AS (DELETE FROM {log_table} RETURNING {", ".join(q(k) for k in key)})
    SELECT {consume}
    IF NOT _whole AND buckets = 0 THEN
        IF only_if_dirty THEN
            status := 'skipped_fresh';
            RETURN;
        END IF;
    END IF;
    threshold := COALESCE(threshold, {float(inc.full_refresh_above)!r});
    IF NOT _whole AND buckets > 0 AND threshold < 1 THEN
        -- Rows in the dirty buckets against all rows (planner estimates): buckets differ
        -- in size, so their number says little.{"".join(estimates)}
        _whole := _total_rows > 0 AND _dirty_rows > threshold * _total_rows;
    END IF;
    IF _whole THEN
        full_refresh := true;
        -- Hash joins: a merge join sorts the whole result and walks the table's index in
        -- full, twice (the vanished keys, then the MERGE).
        _saved_mode := pg_catalog.current_setting('enable_mergejoin');
        PERFORM pg_catalog.set_config('enable_mergejoin', 'off', true);{replace_all}
        _saved_mode := pg_catalog.set_config('enable_mergejoin', _saved_mode, true);
        SELECT pg_catalog.count(*) INTO buckets FROM {tbl};
    ELSIF buckets > 0 THEN
        -- Planned for these buckets: a generic plan cannot know how many rows
        -- "= ANY (array)" selects, and may scan everything for one bucket. (Set here only:
        -- the function's other statements, record() included, keep their cached plans.)
        _saved_mode := pg_catalog.current_setting('plan_cache_mode');
        PERFORM pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', true);{recompute}
        -- (An assignment: an expression of its own, not a statement planned again.)
        _saved_mode := pg_catalog.set_config('plan_cache_mode', _saved_mode, true);
    END IF;
    -- Without the barrier, a writer still holding it may have left a bucket to a log row
    -- consumed here, by a snapshot that does not see its change: log what was consumed again
    -- (the next refresh recomputes it once that writer is done).
    IF _degraded THEN
        IF _whole THEN
            INSERT INTO {whole} DEFAULT VALUES ON CONFLICT DO NOTHING;
        END IF;
        INSERT INTO {log_table} ({", ".join(q(k) for k in key)})
        SELECT {", ".join(f"u{i}.v" for i in range(len(key)))}
          FROM {", ".join(f"pg_catalog.unnest({a}) AS u{i}(v)" for i, a in enumerate(arrays))}
        ON CONFLICT DO NOTHING;
    END IF;
    -- Left: changes committed while this ran (their writers notified).
    IF _degraded OR EXISTS (SELECT 1 FROM {log_table}) OR EXISTS (SELECT 1 FROM {whole}) THEN
        status := 'refreshed_pending';
        IF _degraded THEN
            PERFORM pg_catalog.pg_notify({lit(CHANNEL)}, {lit(f"{view_schema}.{view.name}")});
        END IF;
    ELSE
        status := 'refreshed';
    END IF;
    _spent := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - _started);
    PERFORM {s}.record({lit(view_schema)}, {lit(view.name)}, _started, _spent, 'refreshed',
                       false, NULL);
    INSERT INTO {s}.{q(VIEWS_TABLE)} (view_schema, view_name)
    VALUES ({lit(view_schema)}, {lit(view.name)})
    ON CONFLICT (view_schema, view_name) DO NOTHING;
    UPDATE {s}.{q(VIEWS_TABLE)}
       SET last_refreshed_at = pg_catalog.clock_timestamp(), last_duration = _spent,
           last_concurrently = false, refresh_count = refresh_count + 1
     WHERE view_schema = {lit(view_schema)} AND view_name = {lit(view.name)};
END
"""
        return (
            f"CREATE FUNCTION {s}.{q(names.refresh)}(lock_key bigint, "
            "lock_mode text DEFAULT 'skip', only_if_dirty boolean DEFAULT false, "
            "threshold double precision DEFAULT NULL, OUT status text, OUT buckets bigint, "
            "OUT full_refresh boolean) LANGUAGE plpgsql VOLATILE "
            "SET search_path = "
            + ", ".join(["pg_catalog", *(q(p) for p in path if p != "pg_catalog"), "pg_temp"])
            + f" AS {_dollar(body)}"
        )

    conn.execute(CompiledDDL(build))
    conn.execute(
        CompiledDDL(
            lambda c: (
                f"REVOKE ALL ON FUNCTION {c.preparer.quote_schema(bk)}."
                f"{c.preparer.quote(names.refresh)}({REFRESH_ARGS}) FROM PUBLIC"
            )
        )
    )


# -- drop ----------------------------------------------------------------------------------------


def _before_drop(view: MaterializedView, conn: Connection) -> None:
    """Drop the triggers (with their functions), the log and the refresh function."""
    assert view.incremental is not None
    bk = tracking_schema(view.metadata)
    names = _names(conn, view)
    exists = conn.execute(
        sa.text("SELECT pg_catalog.to_regnamespace(:s) IS NOT NULL"), {"s": bk}
    ).scalar()
    if view.incremental.realtime:
        # The view reads the log: it goes first (DROP TABLE of its rows follows).
        conn.execute(
            CompiledDDL(lambda c: f"DROP VIEW IF EXISTS {c.preparer.format_table(view.table)}")
        )
    if not exists:
        return
    # The triggers depend on their functions: CASCADE drops them (and only them).
    for index, table in enumerate(view.incremental.sources):
        conn.execute(_drop_function(bk, names.trigger_function(index), cascade=True))
        for position in range(len(view.incremental.sources[table])):
            conn.execute(_drop_statistics(bk, names.statistics(index, position)))
    conn.execute(_drop_function(bk, names.refresh, REFRESH_ARGS))
    conn.execute(_drop_function(bk, names.reshaped))
    conn.execute(
        CompiledDDL(
            lambda c: (
                "DROP TABLE IF EXISTS "
                + ", ".join(
                    f"{c.preparer.quote_schema(bk)}.{c.preparer.quote(n)}"
                    for n in (names.log, names.whole, names.leaves)
                )
            )
        )
    )


def _repair_existing(views: list[MaterializedView], conn: Connection) -> None:
    """``create_all``: repair the triggers of incremental views that exist already."""
    for view in views:
        stored = stored_name(view.name) if view.incremental and view.incremental.realtime else None
        name = _formatted(conn, sa.table(stored or view.name, schema=view.schema))
        if conn.execute(sa.select(sa.func.pg_catalog.to_regclass(name))).scalar() is not None:
            repair_incremental(conn, view)


register_incremental_hooks(
    before_create=_before_create,
    after_create=_after_create,
    before_drop=_before_drop,
    repair=_repair_existing,
)


# -- refresh and state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IncrementalStatus:
    """What one incremental refresh did."""

    #: ``"refreshed"``, ``"refreshed_pending"`` (writes committed meanwhile are logged for
    #: the next refresh), ``"skipped_locked"`` or ``"skipped_fresh"``.
    status: str
    #: Buckets recomputed (every stored bucket after a full recompute).
    buckets: int
    #: True when everything was recomputed (a TRUNCATE, or above ``full_refresh_above``).
    full_refresh: bool


@functools.lru_cache(maxsize=256)
def _refresh_call(bk: str, function: str, preparer: IdentifierPreparer) -> sa.TextClause:
    """The statement calling a view's refresh function, built once per function: building
    and caching a ``select()`` of a function anew cost about 0.3 ms at every refresh (its
    cache key), a tenth of what refreshing one bucket costs."""
    return sa.text(
        "SELECT r.status, r.buckets, r.full_refresh FROM "
        f"{preparer.quote_schema(bk)}.{preparer.quote(function)}"
        "(:lock_key, :lock_mode, :only_if_dirty, :threshold) AS r"
    ).bindparams(
        sa.bindparam("lock_key", type_=sa.BigInteger),
        sa.bindparam("lock_mode", type_=sa.Text),
        sa.bindparam("only_if_dirty", type_=sa.Boolean),
        sa.bindparam("threshold", type_=sa.Float),
    )


def refresh_incremental(
    conn: Connection,
    view: MaterializedView | tuple[str, str],
    *,
    lock: str = "skip",
    only_if_dirty: bool = False,
    lock_namespace: str | None = None,
    threshold: float | None = None,
    tracking_schema_name: str | None = None,
) -> IncrementalStatus:
    """Refresh an incremental view in ``conn``'s transaction: recompute its dirty buckets.

    ``view`` is the declared view or ``(schema, name)``. ``lock`` as for
    :func:`~sqlalchemy_matview.refresh_views`; ``only_if_dirty`` returns ``skipped_fresh``
    when nothing is logged; ``threshold`` overrides ``full_refresh_above`` (``None``: the
    declared one, else the one the view was created with). Most code calls
    :func:`~sqlalchemy_matview.refresh_views` / :func:`~sqlalchemy_matview.refresh_stale`,
    which call this.

    Example::

        with engine.begin() as conn:
            done = refresh_incremental(conn, mv_daily)
            print(done.status, done.buckets, done.full_refresh)
    """
    if isinstance(view, MaterializedView):
        schema, name = _view_schema(conn, view), view.name
        if threshold is None and view.incremental is not None:
            threshold = view.incremental.full_refresh_above
        bk = tracking_schema_name or tracking_schema(view.metadata)
    else:
        schema, name = view
        bk = tracking_schema_name or tracking_schema()
    call = _refresh_call(bk, names_for(schema, name).refresh, conn.dialect.identifier_preparer)
    row = conn.execute(
        call,
        {
            "lock_key": lock_key((schema, name), namespace=lock_namespace),
            "lock_mode": lock,
            "only_if_dirty": bool(only_if_dirty),
            "threshold": threshold,
        },
    ).one()
    return IncrementalStatus(str(row.status), int(row.buckets or 0), bool(row.full_refresh))


@dataclass(frozen=True)
class IncrementalState:
    """The log of an incremental view (see :func:`incremental_state`)."""

    #: Distinct buckets logged and not yet recomputed.
    dirty_buckets: int
    #: A source was truncated since the last refresh: everything will be recomputed.
    truncated: bool
    #: A partition was attached with rows, detached or dropped, or a source rewritten (no
    #: trigger fires then): everything will be recomputed.
    reshaped: bool = False

    @property
    def dirty(self) -> bool:
        return self.truncated or self.reshaped or self.dirty_buckets > 0


def is_incremental(
    conn: Connection, schema: str, name: str, tracking_schema_name: str | None = None
) -> bool:
    """True when ``schema.name`` is an incremental view (its refresh function exists)."""
    bk = tracking_schema_name or tracking_schema()
    names = names_for(schema, name)
    return bool(
        conn.execute(
            sa.text(
                "SELECT pg_catalog.to_regprocedure(pg_catalog.quote_ident(:bk) || '.' ||"
                f" pg_catalog.quote_ident(:fn) || '({REFRESH_ARGS})')"
                " IS NOT NULL"
            ),
            {"bk": bk, "fn": names.refresh},
        ).scalar()
    )


def incremental_state(
    conn: Connection,
    view: MaterializedView | tuple[str, str],
    *,
    tracking_schema_name: str | None = None,
) -> IncrementalState:
    """How many buckets of an incremental view are dirty (read-only, one query).

    Example::

        with engine.connect() as conn:
            state = incremental_state(conn, mv_daily)
            print(state.dirty_buckets, state.truncated)
    """
    if isinstance(view, MaterializedView):
        schema, name = _view_schema(conn, view), view.name
        bk = tracking_schema_name or tracking_schema(view.metadata)
    else:
        schema, name = view
        bk = tracking_schema_name or tracking_schema()
    names = names_for(schema, name)
    preparer = conn.dialect.identifier_preparer
    log_table = f"{preparer.quote_schema(bk)}.{preparer.quote(names.log)}"
    whole = f"{preparer.quote_schema(bk)}.{preparer.quote(names.whole)}"
    # The log's key columns, from the catalog: a name is enough to ask.
    key = conn.execute(
        sa.text(
            "SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)"
            " FROM pg_catalog.pg_attribute a"
            " WHERE a.attrelid = pg_catalog.to_regclass(:log) AND a.attnum > 0"
            " AND NOT a.attisdropped AND a.attname <> :xid"
        ),
        {"log": log_table, "xid": XID_COLUMN},
    ).scalar()
    if not key:
        raise IncrementalError(
            f"{schema}.{name} is not an incremental view of this database (no log "
            f"{bk}.{names.log}); create it with create_all"
        )
    # One row per bucket and writing transaction: count the distinct buckets.
    row = conn.execute(
        _Query(
            "SELECT (SELECT pg_catalog.count(*) FROM (SELECT DISTINCT "
            + ", ".join(preparer.quote(k) for k in key)
            + f" FROM {log_table}) AS d) AS buckets,"
            f" EXISTS (SELECT 1 FROM {whole}) AS truncated,"
            f" (SELECT r.reshaped FROM {preparer.quote_schema(bk)}."
            f"{preparer.quote(names.reshaped)}() AS r) AS reshaped"
        )
    ).one()
    return IncrementalState(
        dirty_buckets=int(row.buckets),
        truncated=bool(row.truncated),
        reshaped=bool(row.reshaped),
    )


class _Query(ExecutableDDLElement):
    """A read-only query whose identifiers were quoted by the dialect's preparer."""

    __visit_name__ = "sqlalchemy_matview_incremental_query"
    inherit_cache = False

    def __init__(self, text: str) -> None:
        self.text = text


@compiles(_Query)
def _visit_query(element: _Query, compiler: DDLCompiler, **kw: Any) -> str:
    text: str = compiler.sql_compiler.post_process_text(element.text)  # type: ignore[no-untyped-call]
    return text


def dirty_views(
    conn: Connection, views: Sequence[tuple[str, str]], tracking_schema_name: str | None = None
) -> set[tuple[str, str]]:
    """Which of the incremental ``views`` (``(schema, name)``) have something logged."""
    bk = tracking_schema_name or tracking_schema()
    preparer = conn.dialect.identifier_preparer
    views = list(views)
    if not views:
        return set()
    # One statement for all of them: refresh_stale asks at every pass of a worker.
    probes = []
    for i, (schema, name) in enumerate(views):
        names = names_for(schema, name)
        log_table = f"{preparer.quote_schema(bk)}.{preparer.quote(names.log)}"
        whole = f"{preparer.quote_schema(bk)}.{preparer.quote(names.whole)}"
        reshaped = f"{preparer.quote_schema(bk)}.{preparer.quote(names.reshaped)}"
        # (Leaves that changed at all: the refresh then records them, if nothing else.)
        probes.append(
            f"SELECT {i} AS i WHERE EXISTS (SELECT 1 FROM {log_table})"
            f" OR EXISTS (SELECT 1 FROM {whole}) OR (SELECT r.changed FROM {reshaped}() AS r)"
        )
    dirty = conn.execute(_Query(" UNION ALL ".join(probes))).scalars()
    return {views[int(i)] for i in dirty}


class IncrementalError(MaterializedViewError, RuntimeError):
    """An incremental view's objects are missing (dropped by hand, or bookkeeping removed)."""
