"""DDL constructs for materialized views, their PostgreSQL compilation, and :func:`refresh`.

Each construct is an :class:`~sqlalchemy.sql.ddl.ExecutableDDLElement`, so it runs through
``Connection.execute``, ``Session.execute``, their asyncio twins, and Alembic's
``op.execute`` (online and ``--sql``). Every identifier is quoted by the dialect's
``IdentifierPreparer``; nothing user-supplied is formatted into SQL by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.ddl import CreateIndex, ExecutableDDLElement
from sqlalchemy.sql.elements import ClauseElement

from .errors import (
    ConcurrentRefreshError,
    IncrementalRefreshError,
    MaterializedViewError,
    UnsupportedDialectError,
)
from .query import Definition, as_query, query_sql
from .schema import MaterializedView, _table_of, materialized_view_of

if TYPE_CHECKING:
    from sqlalchemy.sql.selectable import TableClause

__all__ = [
    "PRIVILEGES",
    "PUBLIC",
    "AlterViewOwner",
    "CatalogStatement",
    "CommentOnMaterializedView",
    "CommentOnPlainView",
    "CreateIncrementalTable",
    "CreateMaterializedView",
    "CreatePlainView",
    "DropMaterializedView",
    "DropPlainView",
    "GrantOnView",
    "RefreshMaterializedView",
    "access_statements",
    "qualifying_unique_index",
    "refresh",
]

ViewTarget = MaterializedView | sa.Table | str


def _target_table(target: object, schema: str | None, construct: str) -> sa.Table | TableClause:
    if isinstance(target, str):
        if not target:
            raise TypeError(f"{construct}: the view name must not be empty")
        return sa.table(target, schema=schema)
    table = _table_of(target)
    if table is None:
        raise TypeError(
            f"{construct} takes a MaterializedView, its Table, an ORM class mapped to one, "
            f"or a view name; got {target!r}"
        )
    if schema is not None and schema != table.schema:
        raise TypeError(
            f"{construct}: schema={schema!r} is only for bare names; {table.fullname!r} "
            f"already has schema {table.schema!r}"
        )
    return table


class _ViewDDL(ExecutableDDLElement):
    # Standalone DDL: each statement is compiled afresh, never served from the SQL cache.
    inherit_cache = False

    #: The view's ``Table`` (or a lightweight ``table()`` for a bare name).
    table: sa.Table | TableClause

    @property
    def view(self) -> MaterializedView | None:
        """The declared :class:`MaterializedView`, when the construct was built from one."""
        return materialized_view_of(self.table) if isinstance(self.table, sa.Table) else None


class CreateMaterializedView(_ViewDDL):
    """``CREATE MATERIALIZED VIEW [IF NOT EXISTS] name (columns) AS query WITH [NO] DATA``.

    Built from a declared view, or from a name and a definition (as Alembic operations do;
    ``columns=`` then names the output columns)::

        from sqlalchemy_matview import CreateMaterializedView
        conn.execute(CreateMaterializedView(mv_dashboard, if_not_exists=True))
        conn.execute(CreateMaterializedView("mv_one", "SELECT 1 AS one", schema="reports"))

    A ``select()`` is compiled with its parameters rendered as literals (DDL cannot take bind
    parameters). The column list is written out for declared views, so a SQL definition's
    columns get exactly the names declared in ``columns=``.
    """

    __visit_name__ = "create_materialized_view"

    def __init__(
        self,
        view: MaterializedView | str,
        definition: Definition | None = None,
        *,
        schema: str | None = None,
        if_not_exists: bool = False,
        with_data: bool | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        declared = materialized_view_of(view)
        if declared is not None:
            if definition is not None or columns is not None:
                raise TypeError(
                    f"CreateMaterializedView({declared.fullname!r}): the definition and columns "
                    "come from the declared view; do not pass others"
                )
            self.table = declared.table
            self.definition: ClauseElement = declared.definition
            self.with_data = declared.with_data if with_data is None else with_data
            self.column_names: tuple[str, ...] | None = tuple(c.name for c in declared.table.c)
        else:
            if definition is None:
                raise TypeError(
                    f"CreateMaterializedView({view!r}) needs a definition when given a name"
                )
            self.table = _target_table(view, schema, "CreateMaterializedView")
            self.definition = as_query(definition)
            self.with_data = True if with_data is None else with_data
            self.column_names = tuple(columns) if columns is not None else None
        self.if_not_exists = if_not_exists


class CreateIncrementalTable(_ViewDDL):
    """``CREATE TABLE name (columns) AS query WITH NO DATA``: the table of an incremental view.

    Its columns get exactly the types of the query's. ``create_all`` runs it, then adds the
    primary key, the triggers and the log, and fills the table (see
    :mod:`sqlalchemy_matview.orchestration.incremental`).
    """

    __visit_name__ = "create_incremental_table"

    def __init__(self, view: MaterializedView, *, if_not_exists: bool = False) -> None:
        from .incremental import stored_name

        realtime = view.incremental is not None and view.incremental.realtime
        # A realtime view's rows are stored next to it; the view itself comes after.
        self.table = (
            sa.table(stored_name(view.name), schema=view.schema) if realtime else view.table
        )
        self.definition: ClauseElement = view.definition
        self.column_names = tuple(c.name for c in view.table.c)
        self.if_not_exists = if_not_exists


class DropIncrementalStorage(_ViewDDL):
    """``DROP TABLE`` of the table holding a realtime incremental view's rows (``drop_all``
    runs it after removing the view, its triggers and its log)."""

    __visit_name__ = "drop_incremental_storage"

    def __init__(self, view: MaterializedView, *, if_exists: bool = False) -> None:
        from .incremental import stored_name

        self.table = sa.table(stored_name(view.name), schema=view.schema)
        self.if_exists = if_exists


class DropMaterializedView(_ViewDDL):
    """``DROP MATERIALIZED VIEW [IF EXISTS] name [CASCADE]``.

    ``conn.execute(DropMaterializedView(mv, if_exists=True, cascade=True))``
    """

    __visit_name__ = "drop_materialized_view"

    def __init__(
        self,
        view: ViewTarget,
        *,
        schema: str | None = None,
        if_exists: bool = False,
        cascade: bool = False,
    ) -> None:
        self.table = _target_table(view, schema, "DropMaterializedView")
        self.if_exists = if_exists
        self.cascade = cascade


class RefreshMaterializedView(_ViewDDL):
    """``REFRESH MATERIALIZED VIEW [CONCURRENTLY] name [WITH NO DATA]``.

    Usually obtained from :func:`refresh`, which checks the options before any SQL is sent.
    """

    __visit_name__ = "refresh_materialized_view"

    def __init__(
        self,
        view: ViewTarget,
        *,
        schema: str | None = None,
        concurrently: bool = False,
        with_data: bool = True,
    ) -> None:
        self.table = _target_table(view, schema, "RefreshMaterializedView")
        self.concurrently = concurrently
        self.with_data = with_data


class CommentOnMaterializedView(_ViewDDL):
    """``COMMENT ON MATERIALIZED VIEW name IS '...'`` (``NULL`` removes the comment)."""

    __visit_name__ = "comment_on_materialized_view"

    def __init__(
        self, view: ViewTarget, comment: str | None = None, *, schema: str | None = None
    ) -> None:
        self.table = _target_table(view, schema, "CommentOnMaterializedView")
        declared = materialized_view_of(view)
        self.comment = comment if comment is not None or declared is None else declared.comment


# -- compilation ---------------------------------------------------------------------------


def _refuse_other_dialects(element: _ViewDDL, compiler: DDLCompiler, **kw: Any) -> str:
    raise UnsupportedDialectError(
        f"{type(element).__name__} compiles only for PostgreSQL: materialized views are a "
        f"PostgreSQL feature, and this statement was compiled for {compiler.dialect.name!r}; "
        "use a postgresql:// engine"
    )


for _construct in (
    CreateMaterializedView,
    CreateIncrementalTable,
    DropIncrementalStorage,
    DropMaterializedView,
    RefreshMaterializedView,
    CommentOnMaterializedView,
):
    compiles(_construct)(_refuse_other_dialects)


def definition_query(definition: ClauseElement, compiler: DDLCompiler) -> str:
    """The SQL of a view's query inside a DDL statement compiled by ``compiler``."""
    return query_sql(compiler.dialect, definition, getattr(compiler, "schema_translate_map", None))


def _name(element: _ViewDDL, compiler: DDLCompiler) -> str:
    return compiler.preparer.format_table(element.table)


@compiles(CreateMaterializedView, "postgresql")
def _visit_create(element: CreateMaterializedView, compiler: DDLCompiler, **kw: Any) -> str:
    text = "CREATE MATERIALIZED VIEW "
    if element.if_not_exists:
        text += "IF NOT EXISTS "
    text += _name(element, compiler)
    if element.column_names is not None:
        quote = compiler.preparer.quote
        text += " (" + ", ".join(quote(n) for n in element.column_names) + ")"
    text += f" AS {definition_query(element.definition, compiler)}"
    text += " WITH DATA" if element.with_data else " WITH NO DATA"
    return text


def index_on(index: sa.Index, name: Any, table_name: str, schema: str | None) -> sa.Index:
    """``index``, named ``name``, on a bare table ``schema.table_name`` with the same columns."""
    source = index.table
    assert source is not None
    target = sa.Table(
        table_name,
        sa.MetaData(),
        *(sa.Column(c.name, c.type, key=c.key) for c in source.c),
        schema=schema,
    )

    def swap(element: Any) -> Any:
        if isinstance(element, sa.Column) and element.table is source:
            return target.c[element.key]
        return None

    expressions = [
        visitors.replacement_traverse(e, {}, swap)  # type: ignore[call-overload]
        for e in index.expressions
    ]
    kwargs = dict(index.kwargs)
    include = kwargs.get("postgresql_include")
    if include:
        kwargs["postgresql_include"] = [c.key if isinstance(c, sa.Column) else c for c in include]
    return sa.Index(name, *expressions, unique=bool(index.unique), _table=target, **kwargs)


@compiles(CreateIndex, "postgresql")
def _visit_create_index(element: CreateIndex, compiler: DDLCompiler, **kw: Any) -> str:
    # An index declared on a realtime incremental view goes on the table of its rows (the
    # name itself is a plain view); every other index is left to the dialect.
    index = element.element
    view = materialized_view_of(index.table) if isinstance(index, sa.Index) else None
    if view is not None and view.incremental is not None and view.incremental.realtime:
        from .incremental import stored_name

        moved = index_on(index, index.name, stored_name(view.name), view.schema)
        element = CreateIndex(moved, if_not_exists=bool(getattr(element, "if_not_exists", False)))
    return str(compiler.visit_create_index(element, **kw))  # type: ignore[no-untyped-call]


@compiles(CreateIncrementalTable, "postgresql")
def _visit_create_incremental(
    element: CreateIncrementalTable, compiler: DDLCompiler, **kw: Any
) -> str:
    quote = compiler.preparer.quote
    return (
        "CREATE TABLE "
        + ("IF NOT EXISTS " if element.if_not_exists else "")
        + _name(element, compiler)
        + " ("
        + ", ".join(quote(n) for n in element.column_names)
        + f") AS {definition_query(element.definition, compiler)} WITH NO DATA"
    )


@compiles(DropIncrementalStorage, "postgresql")
def _visit_drop_storage(element: DropIncrementalStorage, compiler: DDLCompiler, **kw: Any) -> str:
    return "DROP TABLE " + ("IF EXISTS " if element.if_exists else "") + _name(element, compiler)


@compiles(DropMaterializedView, "postgresql")
def _visit_drop(element: DropMaterializedView, compiler: DDLCompiler, **kw: Any) -> str:
    text = "DROP MATERIALIZED VIEW "
    if element.if_exists:
        text += "IF EXISTS "
    text += _name(element, compiler)
    if element.cascade:
        text += " CASCADE"
    return text


@compiles(RefreshMaterializedView, "postgresql")
def _visit_refresh(element: RefreshMaterializedView, compiler: DDLCompiler, **kw: Any) -> str:
    text = "REFRESH MATERIALIZED VIEW "
    if element.concurrently:
        text += "CONCURRENTLY "
    text += _name(element, compiler)
    if not element.with_data:
        text += " WITH NO DATA"
    return text


@compiles(CommentOnMaterializedView, "postgresql")
def _visit_comment(element: CommentOnMaterializedView, compiler: DDLCompiler, **kw: Any) -> str:
    if element.comment is None:
        literal = "NULL"
    else:
        literal = compiler.sql_compiler.render_literal_value(element.comment, sa.String())
    # An incremental view is stored as a table.
    inc = element.view.incremental if element.view is not None else None
    kind = "MATERIALIZED VIEW" if inc is None else "VIEW" if inc.realtime else "TABLE"
    return f"COMMENT ON {kind} {_name(element, compiler)} IS {literal}"


# -- refresh() -----------------------------------------------------------------------------


def qualifying_unique_index(table: sa.Table) -> sa.Index | None:
    """A unique index on ``table`` that allows ``REFRESH ... CONCURRENTLY``, or ``None``.

    PostgreSQL accepts only a unique index that is not partial and lists plain columns
    (no expressions); it must cover all rows.
    """
    candidates = []
    for index in table.indexes:
        if not index.unique or index.dialect_options["postgresql"].get("where") is not None:
            continue
        expressions = list(index.expressions)
        if expressions and all(isinstance(e, sa.Column) and e.table is table for e in expressions):
            candidates.append(index)
    candidates.sort(key=lambda i: (len(i.expressions), i.name or ""))
    return candidates[0] if candidates else None


def refresh(
    target: MaterializedView | sa.Table | type | str,
    *,
    schema: str | None = None,
    concurrently: bool = True,
    with_data: bool = True,
) -> RefreshMaterializedView:
    """A ``REFRESH MATERIALIZED VIEW`` statement for ``target``, checked before it is sent.

    ``target`` is a :class:`MaterializedView`, its ``Table``, an ORM class mapped to one, or a
    bare view name (with ``schema=`` separately; names are always quoted, never parsed).

    ``concurrently=True`` (the default) refreshes without blocking readers; it needs a
    populated view with a qualifying unique index, which a declared view gets from
    ``unique_key=``. A declared view without one raises
    :class:`~sqlalchemy_matview.errors.ConcurrentRefreshError` here, before any SQL. A view
    created ``WITH NO DATA`` (``with_data=False``) and never refreshed is not populated:
    only the server knows, so executing the statement raises ``ConcurrentRefreshError`` then
    (the transaction is aborted, as for any failed statement). Refresh it once with
    ``concurrently=False``, or let :func:`~sqlalchemy_matview.refresh_views` decide: its
    ``concurrently="auto"`` refreshes an unpopulated view plainly.

    Executed through an ORM ``Session``, pending changes are flushed first (on SQLAlchemy
    2.0 too), so the refresh sees them::

        session.add(Event(...))
        session.execute(refresh(mv_dashboard))   # REFRESH MATERIALIZED VIEW CONCURRENTLY ...
        session.commit()
    """
    from . import readonly

    readonly.install()
    if isinstance(target, type) and _table_of(target) is None:
        raise TypeError(f"refresh(): {target.__name__} is not an ORM class mapped to a view")
    statement = RefreshMaterializedView(
        target if not isinstance(target, type) else _table_of(target),  # type: ignore[arg-type]
        schema=schema,
        concurrently=concurrently,
        with_data=with_data,
    )
    label = _label(statement)
    if statement.view is not None and statement.view.incremental is not None:
        raise IncrementalRefreshError(
            f"refresh({label}): it is an incremental view, stored as a table that no REFRESH "
            "MATERIALIZED VIEW can refresh; use refresh_views(bind, view) (or refresh_stale), "
            "which recomputes its dirty buckets"
        )
    if concurrently and not with_data:
        raise ConcurrentRefreshError(
            f"refresh({label}): CONCURRENTLY cannot be combined with WITH NO DATA; pass "
            "concurrently=False to empty the view"
        )
    view = statement.view
    if concurrently and isinstance(statement.table, sa.Table):
        if view is not None and view.unique_key:
            return statement
        if qualifying_unique_index(statement.table) is None:
            raise ConcurrentRefreshError(
                f"refresh({label}, concurrently=True): the view has no unique index on plain "
                "columns without a WHERE clause, which REFRESH ... CONCURRENTLY requires; "
                "declare unique_key='column' (or a unique sa.Index on its columns), or pass "
                "concurrently=False"
            )
    return statement


def _label(statement: _ViewDDL) -> str:
    table = statement.table
    schema = getattr(table, "schema", None)
    return repr(f"{schema}.{table.name}" if schema else table.name)


# -- re-creating views as they were: plain views, privileges, owners ---------------------------

#: Privileges a ``GRANT`` can give on a view or materialized view (``MAINTAIN``: PostgreSQL
#: 17+). Only these words are ever written into a ``GRANT`` statement.
PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"}
)

#: The grantee that stands for ``PUBLIC``: PostgreSQL reserves the role name ``public``.
PUBLIC = "public"


class _PlainViewDDL(ExecutableDDLElement):
    inherit_cache = False

    def __init__(self, name: str, schema: str | None) -> None:
        self.table = sa.table(name, schema=schema)


class CreatePlainView(_PlainViewDDL):
    """``CREATE VIEW name [WITH (options)] AS query``, for re-creating a dependent view."""

    def __init__(
        self, name: str, schema: str | None, definition: Definition, options: Sequence[str] = ()
    ) -> None:
        super().__init__(name, schema)
        self.definition = as_query(definition)
        self.view_options = tuple(options)


class DropPlainView(_PlainViewDDL):
    """``DROP VIEW name``."""


class CommentOnPlainView(_PlainViewDDL):
    """``COMMENT ON VIEW name IS '...'``."""

    def __init__(self, name: str, schema: str | None, comment: str) -> None:
        super().__init__(name, schema)
        self.comment = comment


class CatalogStatement(ExecutableDDLElement):
    """A complete statement as PostgreSQL printed it (``pg_get_indexdef``), run verbatim."""

    inherit_cache = False

    def __init__(self, statement: str) -> None:
        self.statement = statement


class GrantOnView(_PlainViewDDL):
    """``GRANT privileges ON view TO role [WITH GRANT OPTION]``; ``"public"`` is ``PUBLIC``.

    Example::

        GrantOnView("mv_daily", None, ("SELECT",), "Report Reader")
        # GRANT SELECT ON mv_daily TO "Report Reader"
    """

    def __init__(
        self,
        name: str,
        schema: str | None,
        privileges: Sequence[str],
        grantee: str,
        grantable: bool = False,
    ) -> None:
        super().__init__(name, schema)
        self.privileges = tuple(privileges)
        self.grantee = grantee
        self.grantable = grantable


class AlterViewOwner(_PlainViewDDL):
    """``ALTER [MATERIALIZED] VIEW view OWNER TO role``.

    Example::

        AlterViewOwner("mv_daily", None, "reporting", materialized=True)
    """

    def __init__(self, name: str, schema: str | None, owner: str, *, materialized: bool) -> None:
        super().__init__(name, schema)
        self.owner = owner
        self.materialized = materialized


def access_statements(
    name: str,
    schema: str | None,
    *,
    materialized: bool,
    grants: Sequence[tuple[str, str, bool]],
    owner: str | None,
    current_user: str | None,
) -> list[ExecutableDDLElement]:
    """The statements giving a view just created the owner and privileges of the one it
    replaces: ``ALTER ... OWNER TO`` first, then one ``GRANT`` per role and grant option.

    The owner comes first, so that the grants are recorded as given by the owner, as they
    were; they may then name the role running the statements. ``current_user`` is ``None``
    when it is unknown (``--sql``): ``OWNER TO`` is then always written (a no-op for the same
    role). ``grants`` are ``(grantee, privilege, grantable)``; the owner's own are implicit.
    """
    statements: list[ExecutableDDLElement] = []
    if owner is not None and owner != current_user:
        statements.append(AlterViewOwner(name, schema, owner, materialized=materialized))
    grouped: dict[tuple[str, bool], list[str]] = {}
    for grantee, privilege, grantable in grants:
        if grantee == owner:
            continue
        privileges = grouped.setdefault((grantee, grantable), [])
        if privilege not in privileges:
            privileges.append(privilege)
    for (grantee, grantable), privileges in grouped.items():
        statements.append(GrantOnView(name, schema, privileges, grantee, grantable))
    return statements


# Reloptions of a view are "key=value" words; anything else is not written back.
_OPTION = re.compile(r"^[a-z_]+=[A-Za-z0-9_]+$")


@compiles(CreatePlainView, "postgresql")
def _visit_create_view(element: CreatePlainView, compiler: DDLCompiler, **kw: Any) -> str:
    text = "CREATE VIEW " + compiler.preparer.format_table(element.table)
    options = [o for o in element.view_options if _OPTION.match(o)]
    if options:
        text += " WITH (" + ", ".join(options) + ")"
    query = definition_query(element.definition, compiler)
    return f"{text} AS {query}"


@compiles(DropPlainView, "postgresql")
def _visit_drop_view(element: DropPlainView, compiler: DDLCompiler, **kw: Any) -> str:
    return "DROP VIEW " + compiler.preparer.format_table(element.table)


@compiles(CommentOnPlainView, "postgresql")
def _visit_comment_view(element: CommentOnPlainView, compiler: DDLCompiler, **kw: Any) -> str:
    literal = compiler.sql_compiler.render_literal_value(element.comment, sa.String())
    return f"COMMENT ON VIEW {compiler.preparer.format_table(element.table)} IS {literal}"


@compiles(GrantOnView, "postgresql")
def _visit_grant(element: GrantOnView, compiler: DDLCompiler, **kw: Any) -> str:
    unknown = [p for p in element.privileges if p not in PRIVILEGES]
    if unknown or not element.privileges:
        raise MaterializedViewError(
            f"GRANT on view {element.table.name!r}: {unknown or 'no privilege'} is not a "
            f"privilege on a view; use {', '.join(sorted(PRIVILEGES))}"
        )
    grantee = "PUBLIC" if element.grantee == PUBLIC else compiler.preparer.quote(element.grantee)
    text = (
        f"GRANT {', '.join(element.privileges)} ON "
        f"{compiler.preparer.format_table(element.table)} TO {grantee}"
    )
    return text + " WITH GRANT OPTION" if element.grantable else text


@compiles(AlterViewOwner, "postgresql")
def _visit_owner(element: AlterViewOwner, compiler: DDLCompiler, **kw: Any) -> str:
    kind = "MATERIALIZED VIEW" if element.materialized else "VIEW"
    return (
        f"ALTER {kind} {compiler.preparer.format_table(element.table)} "
        f"OWNER TO {compiler.preparer.quote(element.owner)}"
    )


@compiles(CatalogStatement, "postgresql")
def _visit_catalog_statement(element: CatalogStatement, compiler: DDLCompiler, **kw: Any) -> str:
    text: str = compiler.sql_compiler.post_process_text(  # type: ignore[no-untyped-call]
        element.statement
    )
    return text
