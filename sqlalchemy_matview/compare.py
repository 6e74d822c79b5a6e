"""Declared materialized views against the database: what must change, in what order.

This module knows nothing of Alembic. :func:`compare_views` reads the catalog and returns plain
records (:class:`CreateView`, :class:`DropView`, :class:`ReplaceView`, :class:`CreateIndex`,
:class:`DropIndex`, :class:`ChangeComment`, :class:`EnableTracking`,
:class:`DisableTracking`, :class:`DetachView`, :class:`AttachView`) in an order that can be
executed as is. The Alembic comparator
(:mod:`sqlalchemy_matview.alembic.comparator`) turns them into operations; other tools (a
``matview diff`` command, a test) can use them directly.

Definitions are compared as PostgreSQL itself prints them. Every declared definition of a view
that exists already is created as a temporary plain view (with the same column names, on the
same connection and ``search_path``) inside one savepoint that is always rolled back, and all
those probes are read back with ``pg_get_viewdef`` in a single query. PostgreSQL prints a
materialized view's query exactly as it prints the same query stored as a view, so equal text
means an equal definition, without any hand-written SQL normalisation.

The number of queries is fixed, whatever the number of views: the materialized views, their
indexes, the default schema, the probes' definitions, the installed change tracking, and
(only when several views are dropped, when a changed view may read a dropped one, or when views
must be detached around table changes) the dependency graph, the views reading columns whose
type changes, the privileges and owners of the views to drop, and the state of the views to
re-create.

A changed view that still reads (in the database) a view being dropped is detached as well:
dropped before that drop, created from its new definition after it.

Privileges and owners: every record that drops a view carries its grants (``relacl`` without
the owner's own) and its owner (``None`` when it is the role comparing), and every record that
creates one again carries the same, so that roles reading the views keep their access.

Detaching views around table changes: a changed view whose definition reads a table that the
same migration alters in a way the old view would block (``DROP COLUMN``, a column type
change, ``DROP TABLE``) cannot be replaced after those changes, because PostgreSQL refuses
them while the old view exists; nor can an unchanged view stay in place while the type of a
column it reads changes. Such a view is *detached*: the view and every view depending on it
are dropped before the table changes (:class:`DetachView`, carrying what is needed to
re-create each of them) and created again after them (:class:`CreateView` with the declared
definition, :class:`AttachView` for the dependents). What the
dependents look like is read from the catalog when the comparison runs, so that the migration
shows it and ``--sql`` can print it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import ClauseElement, TextClause

from . import catalog
from .schema import INFO_KEY, MaterializedView, _as_definition, materialized_views

__all__ = [
    "PRIVILEGES",
    "PUBLIC",
    "AttachView",
    "CapturedView",
    "Change",
    "ChangeComment",
    "CreateIndex",
    "CreateView",
    "DetachView",
    "DisableTracking",
    "DropIndex",
    "DropView",
    "EnableTracking",
    "Grant",
    "IncludeFilter",
    "ReflectedIndex",
    "ReplaceView",
    "ViewRef",
    "capture_views",
    "compare_views",
    "definition_sql",
    "normalize_definition",
]

log = logging.getLogger(__name__)

# Definitions are rendered without a driver: "%" must stay "%", as a user would write it.
_PG_DIALECT = PGDialect(paramstyle="named")  # type: ignore[no-untyped-call]


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReflectedIndex:
    """An index on a materialized view, as the catalog describes it."""

    name: str
    #: Schema of the view (``None``: the default schema).
    schema: str | None
    view_name: str
    unique: bool
    #: Each key element: a column name, or PostgreSQL's text of an expression.
    elements: tuple[str, ...]
    #: ``True`` where the matching element is a plain column.
    is_column: tuple[bool, ...]
    #: ``pg_get_indexdef``: the full ``CREATE INDEX`` statement.
    definition: str
    method: str = "btree"
    #: The partial index's ``WHERE`` condition, if any.
    where: str | None = None

    def to_index(self) -> sa.Index:
        """An equivalent :class:`~sqlalchemy.Index` on a bare ``Table`` of the view.

        Used to build operations that re-create the index (the reverse of a drop).
        """
        table = sa.Table(
            self.view_name,
            sa.MetaData(),
            *(
                sa.Column(element, sa.types.NullType())
                for element, column in zip(self.elements, self.is_column, strict=True)
                if column
            ),
            schema=self.schema,
        )
        exprs: list[Any] = [
            table.c[element] if column else sa.text(element)
            for element, column in zip(self.elements, self.is_column, strict=True)
        ]
        kwargs: dict[str, Any] = {}
        if self.method != "btree":
            kwargs["postgresql_using"] = self.method
        if self.where is not None:
            kwargs["postgresql_where"] = sa.text(self.where)
        return sa.Index(self.name, *exprs, unique=self.unique, _table=table, **kwargs)


#: Privileges a ``GRANT`` can give on a view or materialized view (``MAINTAIN``: PostgreSQL
#: 17+). Only these words are ever written into a ``GRANT`` statement.
PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"}
)

#: The grantee that stands for ``PUBLIC``: PostgreSQL reserves the role name ``public``.
PUBLIC = "public"


class Grant(NamedTuple):
    """One privilege on a view held by a role (or by ``PUBLIC``), as ``aclexplode`` lists it.

    Example::

        Grant("app_reader", "SELECT")           # GRANT SELECT ON v TO app_reader
        Grant("public", "SELECT")               # GRANT SELECT ON v TO PUBLIC
        Grant("Report Reader", "SELECT", True)  # ... TO "Report Reader" WITH GRANT OPTION
    """

    #: Role name, or ``"public"`` for ``PUBLIC``.
    grantee: str
    #: ``SELECT``, ``INSERT``, ... (see :data:`PRIVILEGES`).
    privilege: str
    grantable: bool = False


@dataclass(frozen=True)
class CreateView:
    """Create a declared view that the database does not have."""

    schema: str | None
    name: str
    #: The query as SQL text (compiled for PostgreSQL, parameters rendered as literals).
    definition: str
    with_data: bool
    comment: str | None
    #: Column names to write out, for SQL-text definitions (``None``: the query's own).
    columns: tuple[str, ...] | None
    #: Privileges to grant once created: those of the view this one re-creates, if any.
    grants: tuple[Grant, ...] = ()
    #: Owner to give it once created (``None``: whoever runs the migration).
    owner: str | None = None
    phase = "after"


@dataclass(frozen=True)
class DropView:
    """Drop a view that exists in the database and is not declared (any more)."""

    schema: str | None
    name: str
    #: ``pg_get_viewdef`` text, so that the drop can be reversed.
    definition: str
    with_data: bool
    comment: str | None
    indexes: tuple[ReflectedIndex, ...]
    #: Privileges and owner, so that the reverse (a create) restores them.
    grants: tuple[Grant, ...] = ()
    owner: str | None = None
    phase = "before"


@dataclass(frozen=True)
class ReplaceView:
    """Drop and re-create a view whose definition changed (its dependents are preserved)."""

    schema: str | None
    name: str
    definition: str
    old_definition: str
    with_data: bool
    columns: tuple[str, ...] | None
    phase = "after"


@dataclass(frozen=True)
class CreateIndex:
    """Create a declared index on a view."""

    schema: str | None
    view_name: str
    index: sa.Index
    phase = "after"


@dataclass(frozen=True)
class DropIndex:
    """Drop an index of a view that is not declared (any more)."""

    schema: str | None
    view_name: str
    index: ReflectedIndex
    phase: str = "after"


@dataclass(frozen=True)
class ChangeComment:
    """Set (or remove, with ``None``) the comment of a view."""

    schema: str | None
    name: str
    comment: str | None
    old_comment: str | None
    phase = "after"


@dataclass(frozen=True)
class EnableTracking:
    """Install change tracking for a view declared with ``track_changes=True``."""

    schema: str | None
    name: str
    #: ``(schema, table)`` of every base table the view reads.
    sources: tuple[tuple[str | None, str], ...]
    phase = "after"


@dataclass(frozen=True)
class DisableTracking:
    """Remove the change tracking of a view that no longer asks for it (or is dropped)."""

    schema: str | None
    name: str
    sources: tuple[tuple[str | None, str], ...] | None
    phase: str = "after"


@dataclass(frozen=True)
class CapturedView:
    """A view or materialized view as the catalog describes it: enough to create it again."""

    schema: str
    name: str
    #: ``pg_class.relkind``: ``'m'`` (materialized view) or ``'v'`` (view).
    kind: str
    #: ``pg_get_viewdef`` text, without the final semicolon.
    definition: str
    populated: bool
    comment: str | None
    #: ``reloptions`` of a plain view (``security_barrier=true``, ``check_option=local``).
    options: tuple[str, ...]
    #: ``pg_get_indexdef`` of each index: complete ``CREATE INDEX`` statements, naming the
    #: view without its schema when the ``search_path`` finds it.
    indexes: tuple[str, ...]
    #: ``pg_class.relacl`` without the owner's own privileges (re-created with the view).
    grants: tuple[Grant, ...] = ()
    #: The owning role; ``None`` when it is the role that captured the view, which owns
    #: whatever it creates again anyway.
    owner: str | None = None


@dataclass(frozen=True)
class DetachView:
    """Drop a view (or a view depending on it) before table changes that it would block.

    It is re-created after those changes: by a :class:`CreateView` with the new definition
    for a changed view, by an :class:`AttachView` for a dependent.
    """

    #: ``None``: the default schema.
    schema: str | None
    name: str
    view: CapturedView
    phase = "before"


@dataclass(frozen=True)
class AttachView:
    """Re-create a dependent view dropped by a :class:`DetachView`, as it was."""

    schema: str | None
    name: str
    view: CapturedView
    phase = "after"


Change = (
    CreateView
    | DropView
    | ReplaceView
    | CreateIndex
    | DropIndex
    | ChangeComment
    | EnableTracking
    | DisableTracking
    | DetachView
    | AttachView
)


@dataclass(frozen=True)
class ViewRef:
    """What an include filter is asked about: a declared or a reflected view."""

    schema: str | None
    name: str
    #: The declared ``Table`` of the view; ``None`` for a view found only in the database.
    table: sa.Table | None
    #: ``True`` when the view was found in the database.
    reflected: bool


#: ``include(ref) -> bool``: ``False`` leaves the view (and its indexes) alone.
IncludeFilter = Callable[[ViewRef], bool]


# -- declared views ------------------------------------------------------------------------


@dataclass
class _Declared:
    schema: str | None
    name: str
    definition: ClauseElement
    columns: tuple[str, ...]
    text_definition: bool
    with_data: bool
    comment: str | None
    table: sa.Table
    track_changes: bool = False
    reads: set[tuple[str | None, str]] = field(default_factory=set)
    #: Tables (not views) that the declared definition reads directly.
    tables: set[tuple[str | None, str]] = field(default_factory=set)
    base_tables: tuple[tuple[str | None, str], ...] = ()

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.schema, self.name)


def definition_sql(definition: ClauseElement | str) -> str:
    """The SQL text of a view definition, compiled for PostgreSQL with literal values.

    This is the text that migrations carry and execute::

        >>> import sqlalchemy as sa
        >>> t = sa.table("events", sa.column("kind"))
        >>> definition_sql(sa.select(t.c.kind).where(t.c.kind == "it's"))
        "SELECT events.kind \\nFROM events \\nWHERE events.kind = 'it''s'"
    """
    clause = _as_definition(definition) if isinstance(definition, str) else definition
    compiled = clause.compile(dialect=_PG_DIALECT, compile_kwargs={"literal_binds": True})
    return str(compiled).strip()


def normalize_definition(text: str) -> str:
    """``pg_get_viewdef`` text without its surrounding blanks and final semicolon."""
    return text.strip().rstrip(";").strip()


def _native_view(table: sa.Table) -> Any:
    # SQLAlchemy 2.1's CreateView(materialized=True) leaves its construct on the Table.
    creator = getattr(table, "_creator_ddl", None)
    if getattr(table, "is_view", False) and getattr(creator, "materialized", False):
        return creator
    return None


def is_view_table(table: sa.Table) -> bool:
    """True for a ``Table`` that stands for a view (ours, or SQLAlchemy 2.1's native)."""
    return INFO_KEY in table.info or bool(getattr(table, "is_view", False))


def _declared_views(
    metadatas: Sequence[sa.MetaData], default_schema: str | None
) -> tuple[list[_Declared], set[tuple[str | None, str]]]:
    """Managed views to compare, and the keys of unmanaged ones (never to be touched)."""

    def norm(schema: str | None) -> str | None:
        return None if schema == default_schema else schema

    declared: list[_Declared] = []
    unmanaged: set[tuple[str | None, str]] = set()
    by_table: dict[int, _Declared] = {}
    views: list[MaterializedView] = []
    for metadata in metadatas:
        for view in materialized_views(metadata):
            if not view.managed:
                unmanaged.add((norm(view.schema), view.name))
                continue
            views.append(view)
            item = _Declared(
                schema=norm(view.schema),
                name=view.name,
                definition=view.definition,
                columns=tuple(c.name for c in view.table.c),
                text_definition=isinstance(view.definition, TextClause),
                with_data=view.with_data,
                comment=view.comment,
                table=view.table,
                track_changes=view.track_changes,
            )
            declared.append(item)
            by_table[id(view.table)] = item
        for table in metadata.tables.values():
            native = _native_view(table)
            if native is None or id(table) in by_table:
                continue
            item = _Declared(
                schema=norm(table.schema),
                name=table.name,
                definition=native.selectable,
                columns=tuple(c.name for c in table.c),
                text_definition=isinstance(native.selectable, TextClause),
                with_data=True,
                comment=table.comment,
                table=table,
            )
            declared.append(item)
            by_table[id(table)] = item

    for item in declared:
        owner = item.table.info.get(INFO_KEY)
        sources: Iterable[sa.Table]
        if isinstance(owner, MaterializedView):
            sources = owner.sources
        else:
            sources = [e for e in visitors.iterate(item.definition) if isinstance(e, sa.Table)]
        for source in sources:
            if source is item.table:
                continue
            if id(source) in by_table:
                item.reads.add(by_table[id(source)].key)
            elif not is_view_table(source):
                item.tables.add((norm(source.schema), source.name))
    for item in declared:
        item.base_tables = tuple(_base_tables(item, by_table, norm))
    return declared, unmanaged


def _base_tables(
    item: _Declared,
    by_table: dict[int, _Declared],
    norm: Callable[[str | None], str | None],
) -> Iterator[tuple[str | None, str]]:
    # Change tracking puts triggers on tables; a view read by this view contributes its own
    # tables instead (PostgreSQL has no triggers on materialized views).
    seen: set[int] = set()
    stack = [item.table]
    found: dict[tuple[str | None, str], None] = {}
    while stack:
        table = stack.pop()
        view = table.info.get(INFO_KEY)
        sources = view.sources if isinstance(view, MaterializedView) else ()
        for source in sources:
            if id(source) in seen or source is table:
                continue
            seen.add(id(source))
            if id(source) in by_table or INFO_KEY in source.info:
                stack.append(source)
            else:
                found[(norm(source.schema), source.name)] = None
    return iter(found)


def _topological(items: Sequence[_Declared]) -> list[_Declared]:
    by_key = {item.key: item for item in items}
    ordered: list[_Declared] = []
    state: dict[tuple[str | None, str], int] = {}

    def visit(item: _Declared) -> None:
        mark = state.get(item.key)
        if mark == 2:
            return
        if mark == 1:
            from .errors import DependencyCycleError

            raise DependencyCycleError(
                f"materialized view {item.name!r} depends on itself through other views; "
                "break the cycle in the definitions"
            )
        state[item.key] = 1
        for key in sorted(item.reads, key=lambda k: (k[0] or "", k[1])):
            if key in by_key:
                visit(by_key[key])
        state[item.key] = 2
        ordered.append(item)

    for item in items:
        visit(item)
    return ordered


# -- catalog ---------------------------------------------------------------------------------

_INDEXES = sa.text(
    """
    SELECT n.nspname AS schema, t.relname AS view_name, ic.relname AS name,
           i.indisunique AS "unique", pg_catalog.pg_get_indexdef(i.indexrelid) AS definition,
           am.amname AS method, pg_catalog.pg_get_expr(i.indpred, i.indrelid) AS "where",
           ARRAY(SELECT CASE WHEN i.indkey[k - 1] = 0
                             THEN pg_catalog.pg_get_indexdef(i.indexrelid, k, false)
                             ELSE (SELECT a.attname::text FROM pg_catalog.pg_attribute a
                                    WHERE a.attrelid = i.indrelid
                                      AND a.attnum = i.indkey[k - 1]) END
                   FROM generate_series(1, i.indnkeyatts) AS k ORDER BY k) AS elements,
           ARRAY(SELECT i.indkey[k - 1] <> 0
                   FROM generate_series(1, i.indnkeyatts) AS k ORDER BY k) AS is_column
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = ic.relam
     WHERE t.relkind = 'm' AND n.nspname = ANY (:schemas)
     ORDER BY n.nspname, t.relname, ic.relname
    """
)


def _reflected_indexes(
    conn: Connection, schemas: Sequence[str], default_schema: str | None
) -> dict[tuple[str | None, str], dict[str, ReflectedIndex]]:
    found: dict[tuple[str | None, str], dict[str, ReflectedIndex]] = {}
    for row in conn.execute(_INDEXES, {"schemas": list(schemas)}).mappings():
        schema = None if row["schema"] == default_schema else row["schema"]
        index = ReflectedIndex(
            name=row["name"],
            schema=schema,
            view_name=row["view_name"],
            unique=bool(row["unique"]),
            elements=tuple(row["elements"]),
            is_column=tuple(row["is_column"]),
            definition=row["definition"],
            method=row["method"],
            where=row["where"],
        )
        found.setdefault((schema, row["view_name"]), {})[index.name] = index
    return found


class _CreateProbeView(ExecutableDDLElement):
    inherit_cache = False

    def __init__(self, name: str, columns: Sequence[str], definition: str) -> None:
        self.name = name
        self.columns = tuple(columns)
        self.definition = _as_definition(definition)


@compiles(_CreateProbeView, "postgresql")
def _visit_probe(element: _CreateProbeView, compiler: DDLCompiler, **kw: Any) -> str:
    quote = compiler.preparer.quote
    columns = ", ".join(quote(c) for c in element.columns)
    query = compiler.sql_compiler.process(element.definition, literal_binds=True)
    return f"CREATE TEMPORARY VIEW {quote(element.name)} ({columns}) AS {query}"


_PROBE_PREFIX = "sqlalchemy_matview_probe_"

_PROBE_DEFINITIONS = sa.text(
    """
    SELECT c.relname AS name, pg_catalog.pg_get_viewdef(c.oid) AS definition
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = pg_catalog.pg_my_temp_schema() AND c.relname = ANY (:names)
    """
)


def _normalise(conn: Connection, probes: Sequence[tuple[Sequence[str], str]]) -> list[str | None]:
    """PostgreSQL's text of each ``(columns, definition)``; ``None`` where it cannot be created.

    All probes are created in one savepoint that is rolled back. When one fails (say, it reads
    a column that the same migration adds), the probes are retried one savepoint each, so the
    others still compare.
    """
    if not probes:
        return []
    names = [f"{_PROBE_PREFIX}{i}" for i in range(len(probes))]
    statements = [
        _CreateProbeView(name, columns, sql)
        for name, (columns, sql) in zip(names, probes, strict=True)
    ]
    outer = conn.begin_nested()
    try:
        try:
            for statement in statements:
                conn.execute(statement)
            failed: set[str] = set()
        except DBAPIError:
            outer.rollback()
            outer = conn.begin_nested()
            failed = set()
            for name, statement in zip(names, statements, strict=True):
                inner = conn.begin_nested()
                try:
                    conn.execute(statement)
                except DBAPIError as exc:
                    log.info("definition of probe %s cannot be created: %s", name, exc.orig)
                    inner.rollback()
                    failed.add(name)
                else:
                    inner.commit()
        created = [n for n in names if n not in failed]
        rows = conn.execute(_PROBE_DEFINITIONS, {"names": created})
        texts = {str(row[0]): str(row[1]) for row in rows}
    finally:
        outer.rollback()
    return [normalize_definition(texts[n]) if n in texts else None for n in names]


def _tracking_installed(conn: Connection) -> set[tuple[str, str]] | None:
    try:
        from .orchestration import tracking
    except ImportError:
        return None
    installed = getattr(tracking, "tracking_installed", None)
    if installed is None:
        return None
    return set(installed(conn))


# Pretty-printed index statements name the view as the definitions name their sources:
# unqualified when the search_path finds it, so that a migration written against one schema
# can run against another (schema-per-tenant).
_CAPTURE = sa.text(
    """
    SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
           pg_catalog.pg_get_viewdef(c.oid) AS definition, c.relispopulated AS populated,
           pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
           COALESCE(c.reloptions, '{}')::text[] AS options,
           ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, 0, true)
                   FROM pg_catalog.pg_index i
                  WHERE i.indrelid = c.oid ORDER BY 1) AS indexes,
           NULLIF(pg_catalog.pg_get_userbyid(c.relowner)::text, current_user::text) AS owner,
           COALESCE(acl.grantees, '{}') AS grantees,
           COALESCE(acl.privileges, '{}') AS privileges,
           COALESCE(acl.grantable, '{}') AS grantable
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN unnest(CAST(:schemas AS text[]), CAST(:names AS text[])) AS w(schema, name)
        ON w.schema = n.nspname AND w.name = c.relname
      LEFT JOIN LATERAL (
            SELECT array_agg(e.grantee ORDER BY e.grantee, e.privilege) AS grantees,
                   array_agg(e.privilege ORDER BY e.grantee, e.privilege) AS privileges,
                   array_agg(e.grantable ORDER BY e.grantee, e.privilege) AS grantable
              FROM (SELECT CASE WHEN a.grantee = 0 THEN 'public'
                                ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END AS grantee,
                           a.privilege_type::text AS privilege,
                           bool_or(a.is_grantable) AS grantable
                      FROM pg_catalog.aclexplode(c.relacl) AS a
                     WHERE a.grantee <> c.relowner
                     GROUP BY 1, 2) AS e
           ) AS acl ON true
     WHERE c.relkind IN ('v', 'm')
    """
)


def capture_views(
    conn: Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], CapturedView]:
    """The views and materialized views named by ``(schema, name)`` keys, in one query.

    Each comes with what re-creating it needs: definition, options, populated state,
    comment, indexes, privileges (``pg_class.relacl``) and owner. Keys that name no view
    are left out of the result.

    Example::

        captured = capture_views(conn, [("public", "mv_daily")])
        print(captured["public", "mv_daily"].indexes)
    """
    if not keys:
        return {}
    rows = conn.execute(
        _CAPTURE, {"schemas": [k[0] for k in keys], "names": [k[1] for k in keys]}
    ).mappings()
    found: dict[tuple[str, str], CapturedView] = {}
    for row in rows:
        item = CapturedView(
            schema=row["schema"],
            name=row["name"],
            kind=row["kind"],
            definition=normalize_definition(row["definition"] or ""),
            populated=bool(row["populated"]),
            comment=row["comment"],
            options=tuple(row["options"]),
            indexes=tuple(row["indexes"]),
            grants=tuple(
                Grant(str(grantee), str(privilege), bool(grantable))
                for grantee, privilege, grantable in zip(
                    row["grantees"], row["privileges"], row["grantable"], strict=True
                )
            ),
            owner=row["owner"],
        )
        found[(item.schema, item.name)] = item
    return found


# -- index comparison ------------------------------------------------------------------------


def _index_matches(declared: sa.Index, reflected: ReflectedIndex) -> bool:
    if bool(declared.unique) != reflected.unique:
        return False
    expressions = list(declared.expressions)
    if len(expressions) != len(reflected.elements):
        return False
    options = declared.dialect_options["postgresql"]
    if (options.get("where") is not None) != (reflected.where is not None):
        return False
    using = options.get("using")
    if using and str(using).lower() != reflected.method:
        return False
    for expr, element, column in zip(
        expressions, reflected.elements, reflected.is_column, strict=True
    ):
        declared_column = isinstance(expr, sa.Column)
        if declared_column != column:
            return False
        if declared_column and getattr(expr, "name", None) != element:
            return False
    return True


# -- the comparison --------------------------------------------------------------------------


def compare_views(
    conn: Connection,
    metadata: sa.MetaData | Sequence[sa.MetaData],
    *,
    schemas: Iterable[str | None] | None = None,
    include: IncludeFilter | None = None,
    altered_tables: Iterable[tuple[str | None, str]] = (),
    retyped_columns: Iterable[tuple[str | None, str, str]] = (),
) -> list[Change]:
    """What must change in the database for it to match the views declared in ``metadata``.

    :param conn: a PostgreSQL connection; it is used inside a savepoint that is rolled back,
        so nothing is left behind.
    :param metadata: one ``MetaData`` or several; every :class:`MaterializedView` on them is
        compared, and so are SQLAlchemy 2.1 ``CreateView(..., materialized=True)`` tables.
    :param schemas: schemas to compare, ``None`` standing for the default schema (default:
        only the default schema). Views elsewhere are neither created nor dropped.
    :param include: a filter; views for which it returns ``False`` are left alone.
    :param altered_tables: ``(schema, table)`` of the tables that the same migration changes
        in a way an existing view reading them would block: a dropped table, a dropped
        column, a column whose type changes. A changed view whose definition (old or new)
        reads one of them is detached instead of replaced (see the module docstring):
        :class:`DetachView` records come before those table changes, the :class:`CreateView`
        and :class:`AttachView` records after them.
    :param retyped_columns: ``(schema, table, column)`` of the columns whose type the same
        migration changes. A declared view that reads one (as ``pg_depend`` records it) is
        detached and created again even if its definition did not change.

    Views declared ``managed=False`` and views owned by an extension are never touched. The
    records come in execution order: drops of obsolete views first (dependents before what
    they read), then, view by view in dependency order, index drops, the create or replace,
    index creates, comment and change-tracking changes. The caller puts the records whose
    ``phase`` is ``"before"`` before its own table changes and the others after them.

    Example::

        from sqlalchemy_matview.compare import compare_views
        with engine.connect() as conn:
            for change in compare_views(conn, metadata):
                print(change)
    """
    metadatas = [metadata] if isinstance(metadata, sa.MetaData) else list(metadata)
    default_schema = conn.dialect.default_schema_name or catalog.current_schema(conn)
    wanted: set[str | None] = {None} if schemas is None else set(schemas)
    wanted = {None if s == default_schema else s for s in wanted}
    schema_names = sorted(s if s is not None else default_schema for s in wanted)

    def norm(schema: str | None) -> str | None:
        return None if schema == default_schema else schema

    declared_all, unmanaged = _declared_views(metadatas, default_schema)
    declared = [
        d
        for d in declared_all
        if d.schema in wanted
        and (include is None or include(ViewRef(d.schema, d.name, d.table, False)))
    ]
    existing = {
        (norm(info.schema), info.name): info
        for info in catalog.materialized_views(conn, schema_names)
    }
    indexes = _reflected_indexes(conn, schema_names, default_schema)
    tracked = _tracking_installed(conn)
    tracked_keys = {(norm(s), n) for s, n in tracked} if tracked is not None else set()

    declared_keys = {d.key for d in declared_all}
    obsolete = [
        info
        for key, info in existing.items()
        if key not in declared_keys
        and key not in unmanaged
        and not info.extension_owned
        and (include is None or include(ViewRef(key[0], key[1], None, True)))
    ]

    definitions = {id(d): definition_sql(d.definition) for d in declared}
    to_probe = [d for d in declared if d.key in existing]
    normalised = _normalise(conn, [(d.columns, definitions[id(d)]) for d in to_probe])
    probe_of = {id(d): text for d, text in zip(to_probe, normalised, strict=True)}

    edges: list[catalog.Dependency] | None = None
    if len(obsolete) > 1 or any((norm(i.schema), i.name) in tracked_keys for i in obsolete):
        edges = catalog.dependencies(conn)

    def changed(item: _Declared) -> bool:
        found = existing.get(item.key)
        if found is None:
            return False
        return probe_of[id(item)] != normalize_definition(found.definition or "")

    split: _Split | None = None
    altered = {(norm(s), t) for s, t in altered_tables}
    replaced = [d for d in declared if changed(d)]
    # A changed view that (in the database) still reads a view about to be dropped must be
    # dropped before it, and can only be created from its new definition after it: it is
    # detached like a view blocking a table change.
    blocking: set[Key] = set()
    if obsolete and replaced:
        if edges is None:
            edges = catalog.dependencies(conn)
        graph: dict[FullKey, set[FullKey]] = {}
        for edge in edges:
            graph.setdefault(edge.dependent, set()).add(edge.referenced)
        doomed = {info.qualified_name for info in obsolete}
        blocking = {
            d.key
            for d in replaced
            if _reachable(graph, (d.schema or default_schema or "public", d.name)) & doomed
        }
    rebuilt: list[_Declared] = []
    retyped = [(s or default_schema or "public", t, c) for s, t, c in retyped_columns]
    if retyped:
        readers = _column_readers(conn, retyped)
        rebuilt = [
            d
            for d in declared
            if d.key in existing and (d.schema or default_schema, d.name) in readers
        ]
    if (altered and replaced) or rebuilt or blocking:
        if edges is None:
            edges = catalog.dependencies(conn)
        split = _Split.plan(
            conn,
            replaced,
            rebuilt,
            altered,
            edges,
            {(norm(i.schema), i.name) for i in obsolete},
            default_schema,
            blocking,
        )

    # Privileges and owners of the views to drop, so that downgrades give them back.
    access = capture_views(conn, [info.qualified_name for info in obsolete])
    drops: list[tuple[FullKey, list[Change]]] = []
    for info in _drop_order(obsolete, edges or []):
        key = (norm(info.schema), info.name)
        view_indexes = tuple(indexes.get(key, {}).values())
        group: list[Change] = []
        if key in tracked_keys:
            sources = _db_base_tables(edges or [], info.qualified_name, norm)
            group.append(DisableTracking(key[0], key[1], sources, phase="before"))
        group.extend(DropIndex(key[0], key[1], i, phase="before") for i in view_indexes)
        captured_view = access.get(info.qualified_name)
        group.append(
            DropView(
                schema=key[0],
                name=key[1],
                definition=normalize_definition(info.definition or ""),
                with_data=info.populated,
                comment=info.comment,
                indexes=view_indexes,
                grants=captured_view.grants if captured_view else (),
                owner=captured_view.owner if captured_view else None,
            )
        )
        drops.append((info.qualified_name, group))
    if split is not None:
        drops.extend(((d.schema or default_schema or "public", d.name), [d]) for d in split.detach)
    changes: list[Change] = [c for _, group in _readers_first(drops, edges or []) for c in group]

    for item in _topological(declared):
        sql = definitions[id(item)]
        columns = item.columns if item.text_definition else None
        found = existing.get(item.key)
        declared_indexes = {str(i.name): i for i in item.table.indexes if i.name}
        if split is not None and item.key in split.views:
            # Detached before the table changes: created anew, with every declared index,
            # the declared comment and the privileges it had; then the dependents that only
            # waited for it.
            old_view = split.captured.get(item.key)
            changes.append(
                CreateView(
                    item.schema,
                    item.name,
                    sql,
                    item.with_data,
                    item.comment,
                    columns,
                    grants=old_view.grants if old_view else (),
                    owner=old_view.owner if old_view else None,
                )
            )
            for name in sorted(declared_indexes):
                changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
            changes.extend(split.attach_ready(item.key))
        elif found is None:
            changes.append(
                CreateView(item.schema, item.name, sql, item.with_data, item.comment, columns)
            )
            for name in sorted(declared_indexes):
                changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
        else:
            current = indexes.get(item.key, {})
            stale = [
                current[name]
                for name in sorted(current)
                if name not in declared_indexes
                or not _index_matches(declared_indexes[name], current[name])
            ]
            changes.extend(DropIndex(item.schema, item.name, i) for i in stale)
            old = normalize_definition(found.definition or "")
            if probe_of[id(item)] != old:
                changes.append(
                    ReplaceView(item.schema, item.name, sql, old, item.with_data, columns)
                )
            stale_names = {i.name for i in stale}
            for name in sorted(declared_indexes):
                if name not in current or name in stale_names:
                    changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
            if (item.comment or None) != (found.comment or None):
                changes.append(ChangeComment(item.schema, item.name, item.comment, found.comment))
        if tracked is not None:
            if item.track_changes and item.key not in tracked_keys:
                changes.append(EnableTracking(item.schema, item.name, item.base_tables))
            elif not item.track_changes and item.key in tracked_keys:
                changes.append(DisableTracking(item.schema, item.name, item.base_tables))
    if split is not None:
        changes.extend(split.attach_rest())
    return changes


Key = tuple[str | None, str]
FullKey = tuple[str, str]


@dataclass
class _Split:
    """Changed views detached around table changes, and the views that depend on them."""

    #: The changed views (``None`` schema for the default one) that are detached.
    views: set[Key]
    #: Drops, readers before what they read.
    detach: list[DetachView]
    #: Dependents to re-create, in dependency order, each with what it reads among the
    #: detached views and dependents.
    pending: list[tuple[AttachView, set[Key]]]
    #: The changed views as they are in the database (their privileges go to the new ones).
    captured: dict[Key, CapturedView] = field(default_factory=dict)
    done: set[Key] = field(default_factory=set)

    @classmethod
    def plan(
        cls,
        conn: Connection,
        replaced: Sequence[_Declared],
        rebuilt: Sequence[_Declared],
        altered: set[Key],
        edges: Sequence[catalog.Dependency],
        dropped: set[Key],
        default_schema: str | None,
        blocking: Iterable[Key] = (),
    ) -> _Split | None:
        def full(key: Key) -> FullKey:
            return (key[0] or default_schema or "public", key[1])

        def short(key: FullKey) -> Key:
            return (None if key[0] == default_schema else key[0], key[1])

        reads: dict[FullKey, set[FullKey]] = {}
        readers: dict[FullKey, set[FullKey]] = {}
        for edge in edges:
            reads.setdefault(edge.dependent, set()).add(edge.referenced)
            readers.setdefault(edge.referenced, set()).add(edge.dependent)
        altered_full = {full(k) for k in altered}

        views: set[FullKey] = {full(item.key) for item in rebuilt}
        views |= {full(key) for key in blocking}
        for item in replaced:
            key = full(item.key)
            now = reads.get(key, set()) | {full(t) for t in item.tables}
            if now & altered_full:
                views.add(key)
        if not views:
            return None
        # A changed view that reads a detached one (directly or through other views) is
        # detached too: re-created from its old definition, it might not fit the new one.
        for item in replaced:
            key = full(item.key)
            if key not in views and _reachable(reads, key) & views:
                views.add(key)

        dependents: set[FullKey] = set()
        for key in views:
            dependents |= _reachable(readers, key)
        dependents -= views
        dependents -= {full(k) for k in dropped}
        members = views | dependents
        captured = capture_views(conn, sorted(members))
        members &= set(captured)
        order = _creation_order(members, reads)

        detach = [DetachView(*short(key), captured[key]) for key in reversed(order)]
        pending = [
            (
                AttachView(*short(key), captured[key]),
                {short(ref) for ref in reads.get(key, ()) if ref in members},
            )
            for key in order
            if key in dependents
        ]
        return cls(
            {short(k) for k in views},
            detach,
            pending,
            {short(k): captured[k] for k in views if k in captured},
        )

    def attach_ready(self, created: Key) -> list[AttachView]:
        """After ``created``: the dependents whose every detached source now exists."""
        self.done.add(created)
        ready: list[AttachView] = []
        progress = True
        while progress:
            progress = False
            for entry in list(self.pending):
                attach, needs = entry
                if needs <= self.done:
                    self.pending.remove(entry)
                    self.done.add((attach.schema, attach.name))
                    ready.append(attach)
                    progress = True
        return ready

    def attach_rest(self) -> list[AttachView]:
        rest = [attach for attach, _ in self.pending]
        self.pending.clear()
        return rest


_COLUMN_READERS = sa.text(
    """
    SELECT DISTINCT vn.nspname AS schema, v.relname AS name
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
      JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
      JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
      JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
      JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
      JOIN unnest(CAST(:schemas AS text[]), CAST(:tables AS text[]), CAST(:columns AS text[]))
           AS w(schema, tab, col)
        ON w.schema = tn.nspname AND w.tab = t.relname AND w.col = a.attname
     WHERE d.classid = 'pg_catalog.pg_rewrite'::regclass
       AND d.refclassid = 'pg_catalog.pg_class'::regclass
       AND d.refobjsubid > 0
       AND v.relkind = 'm'
    """
)


def _column_readers(conn: Connection, columns: Sequence[tuple[str, str, str]]) -> set[FullKey]:
    """Materialized views whose query reads one of the ``(schema, table, column)``."""
    rows = conn.execute(
        _COLUMN_READERS,
        {
            "schemas": [c[0] for c in columns],
            "tables": [c[1] for c in columns],
            "columns": [c[2] for c in columns],
        },
    )
    return {(str(row[0]), str(row[1])) for row in rows}


def _reachable(graph: dict[FullKey, set[FullKey]], start: FullKey) -> set[FullKey]:
    seen: set[FullKey] = set()
    stack = [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen and nxt != start:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _creation_order(members: set[FullKey], reads: dict[FullKey, set[FullKey]]) -> list[FullKey]:
    """``members``, each after every member it reads (directly or through others)."""
    ordered: list[FullKey] = []
    done: set[FullKey] = set()

    def visit(key: FullKey) -> None:
        if key in done:
            return
        done.add(key)
        for ref in sorted(_reachable(reads, key) & members):
            visit(ref)
        ordered.append(key)

    for key in sorted(members):
        visit(key)
    return ordered


def _db_base_tables(
    edges: Sequence[catalog.Dependency],
    start: tuple[str, str],
    norm: Callable[[str | None], str | None],
) -> tuple[tuple[str | None, str], ...]:
    """What a view in the database reads, looking through materialized views to tables."""
    reads: dict[tuple[str, str], list[catalog.Dependency]] = {}
    for edge in edges:
        reads.setdefault(edge.dependent, []).append(edge)
    found: dict[tuple[str | None, str], None] = {}
    seen = {start}
    stack = [start]
    while stack:
        for edge in reads.get(stack.pop(), ()):
            ref = edge.referenced
            if edge.referenced_kind == "m":
                if ref not in seen:
                    seen.add(ref)
                    stack.append(ref)
            else:
                found[(norm(ref[0]), ref[1])] = None
    return tuple(sorted(found, key=lambda k: (k[0] or "", k[1])))


def _readers_first(
    drops: Sequence[tuple[FullKey, list[Change]]],
    edges: Sequence[catalog.Dependency],
) -> list[tuple[FullKey, list[Change]]]:
    """``drops`` reordered so that each comes after every one that reads it (transitively).

    Stable: the given order is kept where the dependencies do not decide.
    """
    if len(drops) < 2:
        return list(drops)
    reads: dict[FullKey, set[FullKey]] = {}
    for edge in edges:
        reads.setdefault(edge.dependent, set()).add(edge.referenced)
    keys = [key for key, _ in drops]
    members = set(keys)
    readers: dict[FullKey, list[FullKey]] = {key: [] for key in keys}
    for key in keys:
        for ref in _reachable(reads, key) & members:
            readers[ref].append(key)
    by_key = dict(drops)
    ordered: list[tuple[FullKey, list[Change]]] = []
    done: set[FullKey] = set()

    def visit(key: FullKey) -> None:
        if key in done:
            return
        done.add(key)
        for reader in readers[key]:
            visit(reader)
        ordered.append((key, by_key[key]))

    for key in keys:
        visit(key)
    return ordered


def _drop_order(
    obsolete: list[catalog.MaterializedViewInfo],
    edges: Sequence[catalog.Dependency],
) -> list[catalog.MaterializedViewInfo]:
    """Views to drop, each before anything it reads (directly or through plain views)."""
    if len(obsolete) < 2:
        return obsolete
    reads: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for edge in edges:
        reads.setdefault(edge.dependent, set()).add(edge.referenced)
    dropping = {info.qualified_name: info for info in obsolete}

    def reachable(start: tuple[str, str]) -> set[tuple[str, str]]:
        seen: set[tuple[str, str]] = set()
        stack = [start]
        while stack:
            for ref in reads.get(stack.pop(), ()):
                if ref not in seen:
                    seen.add(ref)
                    stack.append(ref)
        return seen

    # Readers first: a view is dropped after every dropped view that (transitively) reads it.
    readers: dict[tuple[str, str], set[tuple[str, str]]] = {k: set() for k in dropping}
    for key in dropping:
        for ref in reachable(key):
            if ref in dropping:
                readers[ref].add(key)
    ordered: list[catalog.MaterializedViewInfo] = []
    done: set[tuple[str, str]] = set()

    def visit(key: tuple[str, str]) -> None:
        if key in done:
            return
        done.add(key)
        for reader in sorted(readers[key]):
            visit(reader)
        ordered.append(dropping[key])

    for key in sorted(dropping):
        visit(key)
    return ordered
