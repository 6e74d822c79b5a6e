"""What the materialized-view operations execute.

Every statement is a SQLAlchemy DDL element (from :mod:`sqlalchemy_matview.ddl`, or the small
ones below for plain views and statements read back from the catalog), executed one at a time
through ``operations.execute`` so that ``alembic upgrade --sql`` prints it and asyncpg, which
takes one statement per call, runs it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.ddl import ExecutableDDLElement

from .. import catalog
from ..compare import PRIVILEGES, PUBLIC, Grant, capture_views
from ..compare.plan import dependents_in_order
from ..ddl import (
    CommentOnMaterializedView,
    CreateMaterializedView,
    DropMaterializedView,
    RefreshMaterializedView,
    definition_query,
)
from ..errors import MaterializedViewError
from ..query import as_query
from .ops import (
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DependentView,
    DisableChangeTrackingOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    RefreshMaterializedViewOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
)

if TYPE_CHECKING:
    from ..schema import Definition

__all__ = [
    "AlterViewOwner",
    "DependentViewError",
    "GrantOnView",
    "OfflineModeError",
    "restore_access",
]

log = logging.getLogger(__name__)


class DependentViewError(MaterializedViewError, RuntimeError):
    """A view that depends on a replaced view could not be re-created on the new definition."""


class OfflineModeError(MaterializedViewError, CommandError):
    """An operation cannot run with ``alembic upgrade --sql``: it needs a live database.

    A subclass of Alembic's ``CommandError``, so that the ``alembic`` command reports it in one
    line (``FAILED: ...``) rather than with a traceback.
    """


# -- statements the core does not provide ------------------------------------------------------


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


# -- helpers ------------------------------------------------------------------------------------


def _create(
    name: str,
    definition: Definition,
    schema: str | None,
    with_data: bool,
    columns: Sequence[str] | None,
) -> CreateMaterializedView:
    return CreateMaterializedView(
        name, definition, schema=schema, with_data=with_data, columns=columns
    )


def _bind(operations: Operations, what: str) -> Connection:
    if operations.migration_context.as_sql:
        raise OfflineModeError(
            f"{what} reads the database and cannot run with --sql (offline mode); run this "
            "migration online"
        )
    return operations.get_bind()


def restore_access(
    operations: Operations,
    name: str,
    schema: str | None,
    *,
    materialized: bool,
    grants: Sequence[Grant],
    owner: str | None,
    current_user: str | None,
) -> None:
    """Give a view just created the owner and privileges of the view it replaces.

    The owner comes first: the grants are then recorded as given by the owner, as they were,
    and they may name the role running the migration. ``current_user`` is ``None`` when it is
    unknown (``--sql``), and then ``OWNER TO`` is always written (a no-op for the same role).
    Grants of one role with the same grant option go in one statement.
    """
    if owner is not None and owner != current_user:
        operations.execute(AlterViewOwner(name, schema, owner, materialized=materialized))
    grouped: dict[tuple[str, bool], list[str]] = {}
    for grant in grants:
        if grant.grantee == owner:
            continue
        privileges = grouped.setdefault((grant.grantee, grant.grantable), [])
        if grant.privilege not in privileges:
            privileges.append(grant.privilege)
    for (grantee, grantable), privileges in grouped.items():
        operations.execute(GrantOnView(name, schema, privileges, grantee, grantable))


def _current_user(operations: Operations) -> str | None:
    if operations.migration_context.as_sql:
        return None
    return str(operations.get_bind().scalar(sa.text("SELECT current_user")))


def _restore_op_access(
    operations: Operations,
    op: CreateMaterializedViewOp | CreatePlainViewOp,
    *,
    materialized: bool,
) -> None:
    if not op.grants and op.owner is None:
        return
    current = _current_user(operations) if op.owner is not None else None
    restore_access(
        operations,
        op.name,
        op.schema,
        materialized=materialized,
        grants=op.grants or (),
        owner=op.owner,
        current_user=current,
    )


# -- create / drop / refresh / comment ----------------------------------------------------------


@Operations.implementation_for(CreateMaterializedViewOp)
def create_materialized_view(operations: Operations, op: CreateMaterializedViewOp) -> None:
    operations.execute(_create(op.name, op.definition, op.schema, op.with_data, op.columns))
    if op.comment is not None:
        operations.execute(CommentOnMaterializedView(op.name, op.comment, schema=op.schema))
    for index in op.indexes or ():
        operations.execute(CatalogStatement(index))
    _restore_op_access(operations, op, materialized=True)


@Operations.implementation_for(DropMaterializedViewOp)
def drop_materialized_view(operations: Operations, op: DropMaterializedViewOp) -> None:
    operations.execute(
        DropMaterializedView(op.name, schema=op.schema, if_exists=op.if_exists, cascade=op.cascade)
    )


@Operations.implementation_for(CreatePlainViewOp)
def create_plain_view(operations: Operations, op: CreatePlainViewOp) -> None:
    operations.execute(CreatePlainView(op.name, op.schema, op.definition, op.options or ()))
    if op.comment is not None:
        operations.execute(CommentOnPlainView(op.name, op.schema, op.comment))
    _restore_op_access(operations, op, materialized=False)


@Operations.implementation_for(DropPlainViewOp)
def drop_plain_view(operations: Operations, op: DropPlainViewOp) -> None:
    operations.execute(DropPlainView(op.name, op.schema))


@Operations.implementation_for(RefreshMaterializedViewOp)
def refresh_materialized_view(operations: Operations, op: RefreshMaterializedViewOp) -> None:
    operations.execute(
        RefreshMaterializedView(
            op.name, schema=op.schema, concurrently=op.concurrently, with_data=op.with_data
        )
    )


@Operations.implementation_for(SetMaterializedViewCommentOp)
def set_materialized_view_comment(operations: Operations, op: SetMaterializedViewCommentOp) -> None:
    operations.execute(CommentOnMaterializedView(op.name, op.comment, schema=op.schema))


# -- replace -----------------------------------------------------------------------------------


def _restore_extras(operations: Operations, item: DependentView) -> None:
    for index in item.indexes:
        operations.execute(CatalogStatement(index))
    if item.comment is not None:
        if item.materialized:
            operations.execute(
                CommentOnMaterializedView(item.name, item.comment, schema=item.schema)
            )
        else:
            operations.execute(CommentOnPlainView(item.name, item.schema, item.comment))
    # Captured by the role running the migration: owner is None when that role owns it.
    restore_access(
        operations,
        item.name,
        item.schema,
        materialized=item.materialized,
        grants=[Grant(*g) for g in item.grants],
        owner=item.owner,
        current_user=None,
    )


def _captured_state(
    operations: Operations, op: ReplaceMaterializedViewOp
) -> tuple[DependentView, list[DependentView]]:
    """The view and its dependents, each after what it reads: from the catalog when there is
    one, else as the operation carries them."""
    label = f"replace_materialized_view({op.name!r})"
    if operations.migration_context.as_sql:
        if op.dependents is None:
            raise OfflineModeError(
                f"{label} reads the catalog to keep the view's indexes, comment, privileges "
                "and the views reading it, and cannot run with --sql (offline mode) unless the "
                "operation carries them (dependents=[...], as autogenerate writes it): "
                "regenerate the migration, or run it online"
            )
        own = DependentView(
            op.name,
            "",
            schema=op.schema,
            materialized=True,
            comment=op.comment,
            indexes=op.indexes or (),
            grants=op.grants or (),
            owner=op.owner,
        )
        return own, list(op.dependents)
    conn = operations.get_bind()
    target = (op.schema or catalog.current_schema(conn), op.name)
    order = dependents_in_order(catalog.dependencies(conn), target)
    captured = capture_views(conn, [target, *order])
    found = captured.get(target)
    if found is None or found.kind != "m":
        raise MaterializedViewError(
            f"replace_materialized_view({'.'.join(target)!r}): there is no such materialized "
            "view; use op.create_materialized_view to create it"
        )
    own = DependentView.from_captured(found, found.schema)
    return own, [DependentView.from_captured(captured[k], k[0]) for k in order]


@Operations.implementation_for(ReplaceMaterializedViewOp)
def replace_materialized_view(operations: Operations, op: ReplaceMaterializedViewOp) -> None:
    own, dependents = _captured_state(operations, op)
    for item in reversed(dependents):
        if item.materialized:
            operations.execute(DropMaterializedView(item.name, schema=item.schema))
        else:
            operations.execute(DropPlainView(item.name, item.schema))
    operations.execute(DropMaterializedView(op.name, schema=op.schema))
    operations.execute(_create(op.name, op.definition, op.schema, op.with_data, op.columns))
    _restore_extras(operations, own)

    for item in dependents:
        statement: ExecutableDDLElement
        if item.materialized:
            statement = CreateMaterializedView(
                item.name, item.definition, schema=item.schema, with_data=item.with_data
            )
        else:
            statement = CreatePlainView(item.name, item.schema, item.definition, item.options)
        try:
            operations.execute(statement)
        except DBAPIError as exc:
            raise DependentViewError(
                f"replace_materialized_view({op.name!r}): the dependent view "
                f"{item.schema or ''}{'.' if item.schema else ''}{item.name} cannot be "
                f"re-created on the new definition ({exc.orig}); drop or replace it in the "
                "migration before this operation"
            ) from exc
        _restore_extras(operations, item)


# -- change tracking ---------------------------------------------------------------------------


def _tracking() -> Any:
    try:
        from ..orchestration import tracking
    except ImportError as exc:  # pragma: no cover - depends on the installed version
        raise MaterializedViewError(
            "change tracking is not available in this version of sqlalchemy-matview "
            "(sqlalchemy_matview.orchestration.tracking is missing)"
        ) from exc
    return tracking


@Operations.implementation_for(EnableChangeTrackingOp)
def enable_change_tracking(operations: Operations, op: EnableChangeTrackingOp) -> None:
    conn = _bind(operations, f"enable_change_tracking({op.name!r})")
    _tracking().install_tracking(conn, op.schema, op.name, list(op.sources))


@Operations.implementation_for(DisableChangeTrackingOp)
def disable_change_tracking(operations: Operations, op: DisableChangeTrackingOp) -> None:
    conn = _bind(operations, f"disable_change_tracking({op.name!r})")
    _tracking().uninstall_tracking(conn, op.schema, op.name)
