"""Incremental views against the database: what to create, drop and rebuild.

An incremental view is a table, a dirty-bucket log, trigger functions, triggers on its
sources, statistics and a refresh function (see ``docs/incremental.md``). Nothing stores its
declaration, so it is compared by what the database holds: every one of those objects as the
catalog prints it (``pg_get_functiondef``, ``pg_get_triggerdef``, column types, the primary
key...), a *dump*. A declared incremental view that exists already is created again, from its
declaration, inside a savepoint that is always rolled back (its fill is skipped), after its
objects were dropped there; the two dumps are equal exactly when nothing that matters
changed. (The savepoint holds locks on the view's table and its sources until it is rolled
back: a few milliseconds, once per autogenerate.)

The records carry literal SQL, so that a migration is self-contained and ``alembic upgrade
--sql`` prints what a DBA runs with ``psql``:

- :class:`~.records.CreateIncremental`: the statements the library runs to create the view
  (captured while creating it in the savepoint: the same code as ``create_all``), and the
  statements dropping it again;
- :class:`~.records.DropIncremental`: the drop, and a re-creation from the dump that refills
  the table through the view's own refresh function (a full recompute).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..ddl import index_on
from ..incremental import names_for, stored_name
from ..schema import MaterializedView
from .indexes import INDEX_COLUMNS, reflected_index
from .records import (
    Change,
    CreateIncremental,
    CreateIndex,
    DropIncremental,
    DropIndex,
    FullKey,
    Key,
    ReflectedIndex,
)

__all__ = ["capture_create", "compare_incremental", "dump"]

_COLUMNS = sa.text(
    """
    SELECT a.attname::text AS name,
           pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
           a.attnotnull AS notnull,
           pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS "default"
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_attrdef d
        ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum
     WHERE a.attrelid OPERATOR(pg_catalog.=) CAST(:rel AS pg_catalog.regclass)
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
     ORDER BY a.attnum
    """
)

_CONSTRAINTS = sa.text(
    """
    SELECT c.conname::text AS name, pg_catalog.pg_get_constraintdef(c.oid) AS definition
      FROM pg_catalog.pg_constraint c
     WHERE c.conrelid OPERATOR(pg_catalog.=) CAST(:rel AS pg_catalog.regclass)
     ORDER BY c.contype, c.conname
    """
)

_INDEXES = sa.text(
    """
    SELECT pg_catalog.pg_get_indexdef(i.indexrelid) AS definition
      FROM pg_catalog.pg_index i
     WHERE i.indrelid OPERATOR(pg_catalog.=) CAST(:rel AS pg_catalog.regclass)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                        WHERE c.conindid OPERATOR(pg_catalog.=) i.indexrelid)
     ORDER BY 1
    """
)

_FUNCTIONS = sa.text(
    """
    SELECT p.proname::text AS name,
           pg_catalog.pg_get_function_identity_arguments(p.oid) AS args,
           pg_catalog.pg_get_functiondef(p.oid) AS definition
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace OPERATOR(pg_catalog.=) (SELECT b.oid FROM pg_catalog.pg_namespace b
                                                  WHERE b.nspname OPERATOR(pg_catalog.=) :bk)
       AND pg_catalog.starts_with(p.proname, :prefix)
     ORDER BY 1
    """
)

_STATISTICS = sa.text(
    """
    SELECT s.stxname::text AS name, pg_catalog.pg_get_statisticsobjdef(s.oid) AS definition
      FROM pg_catalog.pg_statistic_ext s
     WHERE s.stxnamespace OPERATOR(pg_catalog.=) (SELECT b.oid FROM pg_catalog.pg_namespace b
                                                  WHERE b.nspname OPERATOR(pg_catalog.=) :bk)
       AND pg_catalog.starts_with(s.stxname, :prefix)
     ORDER BY 1
    """
)

# Triggers a partitioned source's trigger cloned to its partitions come back with it.
_TRIGGERS = sa.text(
    """
    SELECT t.tgname::text AS name, pg_catalog.pg_get_triggerdef(t.oid) AS definition,
           t.tgenabled::text AS enabled, t.tgrelid::pg_catalog.regclass::text AS relation
      FROM pg_catalog.pg_trigger t
     WHERE NOT t.tgisinternal AND t.tgparentid OPERATOR(pg_catalog.=) 0
       AND pg_catalog.starts_with(t.tgname, :prefix)
     ORDER BY 1, 4
    """
)

_ENABLE = {"A": "ALWAYS", "R": "REPLICA"}

# The definition of a realtime view's name (NULL for the table of a stored one).
_VIEW = sa.text(
    """
    SELECT pg_catalog.pg_get_viewdef(c.oid) FROM pg_catalog.pg_class c
     WHERE c.oid OPERATOR(pg_catalog.=) CAST(:rel AS pg_catalog.regclass)
       AND c.relkind OPERATOR(pg_catalog.=) 'v'
    """
)


# Storage parameters (the stored table's fillfactor), quoted as CREATE TABLE ... WITH takes
# them: name=value, the value a string literal.
_OPTIONS = sa.text(
    """
    SELECT pg_catalog.quote_ident(o.option_name) OPERATOR(pg_catalog.||) '='
           OPERATOR(pg_catalog.||) pg_catalog.quote_literal(o.option_value)
      FROM pg_catalog.pg_class c, pg_catalog.pg_options_to_table(c.reloptions) AS o
     WHERE c.oid OPERATOR(pg_catalog.=) CAST(:rel AS pg_catalog.regclass)
     ORDER BY o.option_name
    """
)


def _table_ddl(conn: Connection, relation: str) -> list[str]:
    columns = []
    for c in conn.execute(_COLUMNS, {"rel": relation}):
        column = f"{_quote(conn, c.name)} {c.type}"
        if c.default is not None:
            column += f" DEFAULT {c.default}"
        if c.notnull:
            column += " NOT NULL"
        columns.append(column)
    options = list(conn.scalars(_OPTIONS, {"rel": relation}))
    with_ = f" WITH ({', '.join(options)})" if options else ""
    statements = [f"CREATE TABLE {relation} ({', '.join(columns)}){with_}"]
    for con in conn.execute(_CONSTRAINTS, {"rel": relation}):
        statements.append(
            f"ALTER TABLE {relation} ADD CONSTRAINT {_quote(conn, con.name)} {con.definition}"
        )
    statements += [str(i.definition) for i in conn.execute(_INDEXES, {"rel": relation})]
    return statements


def _quote(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _in_schema(conn: Connection, schema: str, name: str) -> str:
    preparer = conn.dialect.identifier_preparer
    return f"{preparer.quote_schema(schema)}.{preparer.quote(name)}"


def dump(conn: Connection, bookkeeping: str, schema: str, name: str) -> tuple[list[str], list[str]]:
    """``(create, drop)``: the statements re-creating the incremental view ``schema.name``
    as the catalog has it (its table refilled by its own refresh function), and dropping it.
    """
    names = names_for(schema, name)
    table = _in_schema(conn, schema, name)
    log = _in_schema(conn, bookkeeping, names.log)
    whole = _in_schema(conn, bookkeeping, names.whole)
    leaves = _in_schema(conn, bookkeeping, names.leaves)
    # realtime=True: the name is a view, over the rows stored in a table of another name.
    view = conn.scalar(_VIEW, {"rel": table})
    stored = _in_schema(conn, schema, stored_name(name)) if view is not None else table
    create = [
        *_table_ddl(conn, stored),
        *_table_ddl(conn, log),
        *_table_ddl(conn, whole),
        *_table_ddl(conn, leaves),
    ]
    drop: list[str] = [] if view is None else [f"DROP VIEW IF EXISTS {table}"]
    functions = list(conn.execute(_FUNCTIONS, {"bk": bookkeeping, "prefix": names.prefix + "_"}))
    for f in functions:
        signature = f"{_in_schema(conn, bookkeeping, f.name)}({f.args})"
        create += [str(f.definition).strip(), f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC"]
        if view is not None and f.name == names.reshaped:
            # Readers of the realtime view call it.
            create.append(f"GRANT EXECUTE ON FUNCTION {signature} TO PUBLIC")
        drop.append(f"DROP FUNCTION IF EXISTS {signature} CASCADE")
    for s in conn.execute(_STATISTICS, {"bk": bookkeeping, "prefix": names.prefix + "_"}):
        create.append(str(s.definition))
        drop.append(f"DROP STATISTICS IF EXISTS {_in_schema(conn, bookkeeping, s.name)}")
    for t in conn.execute(_TRIGGERS, {"prefix": names.trigger("")}):
        create.append(str(t.definition))
        if t.enabled in _ENABLE:
            create.append(
                f"ALTER TABLE {t.relation} ENABLE {_ENABLE[t.enabled]} TRIGGER "
                f"{_quote(conn, t.name)}"
            )
    if view is not None:
        create.append(f"CREATE VIEW {table} AS {str(view).strip().rstrip(';')}")
    drop += [f"DROP TABLE IF EXISTS {log}, {whole}, {leaves}", f"DROP TABLE IF EXISTS {stored}"]
    # Refill: a TRUNCATE mark makes the refresh function recompute everything.
    create += [
        f"INSERT INTO {whole} DEFAULT VALUES",
        f"SELECT status FROM {_in_schema(conn, bookkeeping, names.refresh)}"
        "(0, 'none', false, NULL)",
    ]
    return create, drop


# Each creation draws a random advisory key for the writers' barrier: not a difference.
_BARRIER = re.compile(r"(pg_(?:try_)?advisory_xact_lock(?:_shared)?\()-?[0-9]+\)")

# The indexes of the table holding the rows, but its primary key: declared by the user (the
# log and the TRUNCATE table have none but their primary keys).
_USER_INDEXES = sa.text(
    f"""
    SELECT n.nspname AS schema, t.relname AS view_name, ic.relname AS name, {INDEX_COLUMNS}
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam
     WHERE i.indrelid = pg_catalog.to_regclass(:rel)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid)
     ORDER BY ic.relname
    """
)


def _comparable(statements: Sequence[str]) -> list[str]:
    """``statements`` without what differs between two creations of the same view: the
    barrier key, and the user's indexes (compared one by one, see :func:`_index_changes`)."""
    return [
        _BARRIER.sub(r"\1<barrier>)", s)
        for s in statements
        if not s.startswith(("CREATE INDEX ", "CREATE UNIQUE INDEX "))
    ]


def _rows_table(view: MaterializedView) -> str:
    """The table holding the rows of ``view`` (``<name>__stored`` for a realtime view)."""
    realtime = view.incremental is not None and view.incremental.realtime
    return stored_name(view.name) if realtime else view.name


def _user_indexes(
    conn: Connection, schema: str, view: MaterializedView, key_schema: str | None
) -> dict[str, ReflectedIndex]:
    """The indexes the user declared on the table of the incremental view ``view``."""
    table = _rows_table(view)
    return {
        str(row["name"]): reflected_index(row, key_schema, table, str(row["name"]))
        for row in conn.execute(_USER_INDEXES, {"rel": _in_schema(conn, schema, table)}).mappings()
    }


def _index_changes(
    key: Key, view: MaterializedView, old: dict[str, ReflectedIndex], new: dict[str, ReflectedIndex]
) -> list[Change]:
    """Index drops and creates turning ``old`` into ``new`` (each as ``pg_get_indexdef``
    prints it, on the same table: equal text, same index), for a view otherwise unchanged.
    They name the table of the rows, where a realtime view's indexes are."""
    table = _rows_table(view)
    declared = {
        str(i.name): index_on(i, i.name, table, view.schema) if table != view.name else i
        for i in view.table.indexes
    }
    changes: list[Change] = [
        DropIndex(key[0], table, index)
        for name, index in sorted(old.items())
        if name not in new or new[name].definition != index.definition
    ]
    changes += [
        CreateIndex(key[0], table, declared[name])
        for name, index in sorted(new.items())
        if name in declared and (name not in old or old[name].definition != index.definition)
    ]
    return changes


# The checks' probes (temporary objects) are not part of the view, whatever they name.
_SKIPPED_PREFIXES = ("SELECT", "SAVEPOINT", "RELEASE", "ROLLBACK", "SET ", "CREATE TEMPORARY")


@contextmanager
def _capturing(conn: Connection, keep: Callable[[str], bool], fill: str) -> Iterator[list[str]]:
    """Record the statements without parameters that ``keep`` accepts; the fill (an
    ``INSERT`` starting with ``fill``) is recorded but not run."""
    captured: list[str] = []

    def before(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> tuple[str, Any]:
        text = statement.strip()
        if parameters or text.upper().startswith(_SKIPPED_PREFIXES) or not keep(text):
            return statement, parameters
        captured.append(text)
        if text.startswith(fill):
            return "SELECT 1", parameters
        return statement, parameters

    sa.event.listen(conn, "before_cursor_execute", before, retval=True)
    try:
        yield captured
    finally:
        sa.event.remove(conn, "before_cursor_execute", before)


def capture_create(conn: Connection, view: MaterializedView, schema: str) -> list[str]:
    """Create ``view`` (an incremental view that does not exist) on ``conn`` as
    ``create_all`` does, without filling it, and return the statements that did it,
    the fill included. The caller rolls it back."""
    names = names_for(schema, view.name)
    preparer = conn.dialect.identifier_preparer
    # A realtime view's rows are stored under another name; the name itself is a view.
    realtime = view.incremental is not None and view.incremental.realtime
    stored = stored_name(view.name) if realtime else view.name
    # Each relation as the DDL compiler names it (unqualified in the default schema) and as
    # the orchestration names it (always qualified). The stored table's own name is matched
    # on its own: with quoted names, "Daily View" is not a part of "Daily View__stored".
    own = {str(preparer.format_table(sa.table(n, schema=view.schema))) for n in {view.name, stored}}
    own |= {_in_schema(conn, schema, n) for n in {view.name, stored}}

    def keep(text: str) -> bool:
        return names.prefix in text or any(name in text for name in own)

    # The fill: the orchestration inserts into the qualified stored table.
    with _capturing(conn, keep, f"INSERT INTO {_in_schema(conn, schema, stored)} (") as captured:
        view.table.create(conn)
    return captured


def _create_missing_sources(conn: Connection, view: MaterializedView) -> None:
    """Tables of the view's ``MetaData`` that the migration itself will create: the view
    cannot be created without its sources (and theirs, for foreign keys)."""
    from .declared import is_view_table

    assert view.incremental is not None
    inspector = sa.inspect(conn)
    missing = [
        t
        for t in view.metadata.sorted_tables
        if not is_view_table(t) and not inspector.has_table(t.name, schema=t.schema)
    ]
    if any(t in view.incremental.sources for t in missing):
        view.metadata.create_all(conn, tables=missing)


def compare_incremental(
    conn: Connection,
    views: Sequence[tuple[Key, FullKey, MaterializedView]],
    installed: Sequence[FullKey],
    obsolete: Sequence[tuple[Key, FullKey]],
    bookkeeping: str,
    matviews: Iterable[FullKey] = (),
) -> tuple[list[DropIncremental], list[Change]]:
    """The drops and creates that make the database's incremental views the declared ones.

    ``views``: the declared incremental views (``(key, full key, view)``); ``installed``:
    the incremental views in the database; ``obsolete``: those of them to drop (no longer
    declared, or now declared as another kind of view). A declared view that exists is
    rebuilt (dropped, created and filled again) when any of its objects would differ, but
    for the indexes declared on a stored view's table: those are created and dropped one by
    one (:class:`CreateIndex`, :class:`DropIndex`), as on any table.
    ``matviews``: materialized views that a declared incremental view replaces (the
    caller drops them); they are dropped in the savepoint too.
    """
    drops: list[DropIncremental] = []
    creates: list[Change] = []
    for key, full in obsolete:
        create, drop = dump(conn, bookkeeping, *full)
        drops.append(DropIncremental(key[0], key[1], tuple(drop), tuple(create)))
    present = set(installed)
    occupied = set(matviews)
    for key, full, view in views:
        with conn.begin_nested() as savepoint:
            _create_missing_sources(conn, view)
            if full in occupied:
                conn.exec_driver_sql(f"DROP MATERIALIZED VIEW {_in_schema(conn, *full)} CASCADE")
            old: tuple[list[str], list[str]] | None = None
            old_indexes: dict[str, ReflectedIndex] = {}
            if full in present:
                old = dump(conn, bookkeeping, *full)
                old_indexes = _user_indexes(conn, full[0], view, key[0])
                for statement in old[1]:
                    conn.exec_driver_sql(statement)
            statements = capture_create(conn, view, full[0])
            new = dump(conn, bookkeeping, *full)
            new_indexes = _user_indexes(conn, full[0], view, key[0])
            savepoint.rollback()
        if old is not None and _comparable(old[0]) == _comparable(new[0]):
            creates += _index_changes(key, view, old_indexes, new_indexes)
            continue
        if old is not None:
            drops.append(DropIncremental(key[0], key[1], tuple(old[1]), tuple(old[0])))
        creates.append(CreateIncremental(key[0], key[1], tuple(statements), tuple(new[1])))
    return drops, creates
