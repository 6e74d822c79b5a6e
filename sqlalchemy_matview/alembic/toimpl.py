"""What the materialized-view operations execute.

Every statement is a SQLAlchemy DDL element (from :mod:`sqlalchemy_matview.ddl` and
:mod:`sqlalchemy_matview.swap`), executed one at a time
through ``operations.execute`` so that ``alembic upgrade --sql`` prints it and asyncpg, which
takes one statement per call, runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from ..compare import Grant
from ..ddl import (
    AlterViewOwner,
    CatalogStatement,
    CommentOnMaterializedView,
    CommentOnPlainView,
    CreateMaterializedView,
    CreatePlainView,
    DropMaterializedView,
    DropPlainView,
    GrantOnView,
    RefreshMaterializedView,
    access_statements,
)
from ..errors import MaterializedViewError
from .ops import (
    CreateIncrementalViewOp,
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DisableChangeTrackingOp,
    DropIncrementalViewOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    InstallChangeTrackingOp,
    RefreshMaterializedViewOp,
    SetMaterializedViewCommentOp,
    UninstallChangeTrackingOp,
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

    See :func:`sqlalchemy_matview.ddl.access_statements`: the owner first, then the grants of
    each role and grant option in one statement.
    """
    for statement in access_statements(
        name,
        schema,
        materialized=materialized,
        grants=[(g.grantee, g.privilege, g.grantable) for g in grants],
        owner=owner,
        current_user=current_user,
    ):
        operations.execute(statement)


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


# Under --sql each operation prints what its online form runs: the bookkeeping's DDL, and
# calls of the bookkeeping's own functions (track / untrack), which resolve names and
# create the triggers when the script runs. What only the online form does: refuse
# bookkeeping owned by a role it does not trust, and move 0.1.0's layout.


def _literal(value: str | None) -> str:
    if value is None:
        return "pg_catalog.current_schema()"
    return "'" + value.replace("'", "''") + "'"


def _offline_schema(operations: Operations, schema: str | None) -> str:
    from ..bookkeeping import tracking_schema

    preparer = operations.migration_context.dialect.identifier_preparer
    return str(preparer.quote_schema(schema or tracking_schema()))


@Operations.implementation_for(InstallChangeTrackingOp)
def install_change_tracking(operations: Operations, op: InstallChangeTrackingOp) -> None:
    if operations.migration_context.as_sql:
        from ..bookkeeping import tracking_schema
        from ..orchestration.tracking_sql import setup_statements

        quoted = _offline_schema(operations, op.schema)
        operations.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        for statement in setup_statements(quoted, op.schema or tracking_schema()):
            operations.execute(statement)
        return
    _tracking().ensure_bookkeeping(operations.get_bind(), op.schema)


@Operations.implementation_for(UninstallChangeTrackingOp)
def uninstall_change_tracking(operations: Operations, op: UninstallChangeTrackingOp) -> None:
    if operations.migration_context.as_sql:
        operations.execute(
            f"DROP SCHEMA IF EXISTS {_offline_schema(operations, op.schema)} CASCADE"
        )
        return
    _tracking().uninstall_bookkeeping(operations.get_bind(), op.schema)


@Operations.implementation_for(EnableChangeTrackingOp)
def enable_change_tracking(operations: Operations, op: EnableChangeTrackingOp) -> None:
    if operations.migration_context.as_sql:
        preparer = operations.migration_context.dialect.identifier_preparer
        sources = ", ".join(
            _literal(preparer.format_table(sa.table(name, schema=schema)))
            for schema, name in op.sources
        )
        operations.execute(
            f"SELECT {_offline_schema(operations, op.tracking_schema)}.track("
            f"{_literal(op.schema)}, "
            f"{_literal(op.name)}, ARRAY[{sources}]::pg_catalog.regclass[])"
        )
        return
    conn = _bind(operations, f"enable_change_tracking({op.name!r})")
    _tracking().install_tracking(
        conn, op.schema, op.name, list(op.sources), schema=op.tracking_schema
    )


@Operations.implementation_for(DisableChangeTrackingOp)
def disable_change_tracking(operations: Operations, op: DisableChangeTrackingOp) -> None:
    if operations.migration_context.as_sql:
        operations.execute(
            f"SELECT {_offline_schema(operations, op.tracking_schema)}.untrack("
            f"{_literal(op.schema)}, {_literal(op.name)})"
        )
        return
    conn = _bind(operations, f"disable_change_tracking({op.name!r})")
    _tracking().uninstall_tracking(conn, op.schema, op.name, schema=op.tracking_schema)


# -- incremental views ---------------------------------------------------------------------------


def _run_statements(operations: Operations, statements: Sequence[str]) -> None:
    """Literal SQL: sent as is online; printed as is (``;``-terminated) under ``--sql``."""
    if operations.migration_context.as_sql:
        for statement in statements:
            # Escaped colons: text() must not read ``:=`` or ``::`` as bind parameters.
            operations.execute(sa.text(statement.replace(":", "\\:")))
        return
    conn = operations.get_bind()
    for statement in statements:
        conn.exec_driver_sql(statement)


@Operations.implementation_for(CreateIncrementalViewOp)
def create_incremental_view(operations: Operations, op: CreateIncrementalViewOp) -> None:
    _run_statements(operations, op.statements)


@Operations.implementation_for(DropIncrementalViewOp)
def drop_incremental_view(operations: Operations, op: DropIncrementalViewOp) -> None:
    _run_statements(operations, op.statements)


# The replace operation has a module of its own (two strategies); it registers itself.
from . import replace as _replace  # noqa: E402

del _replace
