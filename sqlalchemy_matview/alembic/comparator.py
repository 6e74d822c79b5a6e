"""The autogenerate comparator: :mod:`sqlalchemy_matview.compare` records turned into ops.

It runs after Alembic's own table comparison (``DispatchPriority.LAST`` on Alembic 1.18+;
registration order on older versions), so that it can

* remove what Alembic proposed for a view's ``Table`` -- ``create_table``, ``drop_table``,
  column and index operations -- whether the view is a :class:`MaterializedView`, an
  unmanaged one or a SQLAlchemy 2.1 ``CreateView(..., materialized=True)``, and for the
  change-tracking state table;
* put view drops before everything else (before the drops of the tables they read) and view
  creates after everything else (after the tables they read are created);
* tell :func:`~sqlalchemy_matview.compare.compare_views` which tables Alembic's operations drop
  or drop columns of, and which columns they give a new type, so that a changed view reading
  one (and an unchanged view reading a retyped column) is dropped before those operations and
  created after them, instead of blocking them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.operations import ops as alembic_ops

from .. import compare
from ..compare import Change, ViewRef
from ..compare.indexes import renderable_index
from ..schema import materialized_views
from .ops import (
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DisableChangeTrackingOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
)

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["compare_materialized_views", "to_operation"]

log = logging.getLogger(__name__)

#: ``type_`` given to ``include_object`` / ``include_name`` hooks for materialized views.
OBJECT_TYPE = "materialized_view"

_DONE_KEY = "sqlalchemy_matview.compared"


def to_operation(change: Change) -> alembic_ops.MigrateOperation:
    """The Alembic operation that carries out one :mod:`~sqlalchemy_matview.compare` record."""
    if isinstance(change, compare.CreateView):
        return CreateMaterializedViewOp(
            change.name,
            change.definition,
            schema=change.schema,
            with_data=change.with_data,
            comment=change.comment,
            columns=change.columns,
            grants=change.grants or None,
            owner=change.owner,
        )
    if isinstance(change, compare.DropView):
        return DropMaterializedViewOp(
            change.name,
            schema=change.schema,
            definition=change.definition,
            with_data=change.with_data,
            comment=change.comment,
            grants=change.grants or None,
            owner=change.owner,
        )
    if isinstance(change, compare.ReplaceView):
        return ReplaceMaterializedViewOp(
            change.name,
            change.definition,
            schema=change.schema,
            with_data=change.with_data,
            old_definition=change.old_definition,
            columns=change.columns,
        )
    if isinstance(change, compare.DetachView):
        view = change.view
        if view.kind == "v":
            return DropPlainViewOp(
                change.name,
                schema=change.schema,
                definition=view.definition,
                comment=view.comment,
                options=view.options or None,
                grants=view.grants or None,
                owner=view.owner,
            )
        return DropMaterializedViewOp(
            change.name,
            schema=change.schema,
            definition=view.definition,
            with_data=view.populated,
            comment=view.comment,
            indexes=view.indexes or None,
            grants=view.grants or None,
            owner=view.owner,
        )
    if isinstance(change, compare.AttachView):
        view = change.view
        if view.kind == "v":
            return CreatePlainViewOp(
                change.name,
                view.definition,
                schema=change.schema,
                comment=view.comment,
                options=view.options or None,
                grants=view.grants or None,
                owner=view.owner,
            )
        return CreateMaterializedViewOp(
            change.name,
            view.definition,
            schema=change.schema,
            with_data=view.populated,
            comment=view.comment,
            indexes=view.indexes or None,
            grants=view.grants or None,
            owner=view.owner,
        )
    if isinstance(change, compare.CreateIndex):
        return alembic_ops.CreateIndexOp.from_index(renderable_index(change.index))
    if isinstance(change, compare.DropIndex):
        return alembic_ops.DropIndexOp.from_index(change.index.to_index())
    if isinstance(change, compare.ChangeComment):
        return SetMaterializedViewCommentOp(
            change.name, change.comment, schema=change.schema, existing_comment=change.old_comment
        )
    if isinstance(change, compare.EnableTracking):
        return EnableChangeTrackingOp(change.name, change.sources, schema=change.schema)
    if isinstance(change, compare.DisableTracking):
        return DisableChangeTrackingOp(change.name, schema=change.schema, sources=change.sources)
    raise TypeError(f"unknown change record {change!r}")


def _metadatas(autogen_context: AutogenContext) -> list[sa.MetaData]:
    metadata: Any = autogen_context.metadata
    if metadata is None:
        return []
    if isinstance(metadata, sa.MetaData):
        return [metadata]
    return list(metadata)


def _bookkeeping_tables() -> set[str]:
    """Tables that change tracking creates itself: never for autogenerate to drop."""
    try:
        from ..orchestration import tracking
    except ImportError:
        return set()
    names = (getattr(tracking, "STATE_TABLE", None), getattr(tracking, "CHANGES_TABLE", None))
    return {n for n in names if isinstance(n, str)}


def _view_table_keys(
    metadatas: Sequence[sa.MetaData], default_schema: str | None
) -> set[tuple[str | None, str]]:
    keys: set[tuple[str | None, str]] = set()
    for metadata in metadatas:
        for table in metadata.tables.values():
            if compare.is_view_table(table):
                keys.add((None if table.schema == default_schema else table.schema, table.name))
        for view in materialized_views(metadata):
            schema = None if view.schema == default_schema else view.schema
            keys.add((schema, view.name))
    return keys


def _altered_tables(
    upgrade_ops: alembic_ops.UpgradeOps,
) -> tuple[set[tuple[str | None, str]], set[tuple[str | None, str, str]]]:
    """Tables and retyped columns whose changes an existing view reading them would block.

    PostgreSQL refuses to drop a table or a column, or to change a column's type, while a view
    reads it. Adding a column, or renaming one (views follow renames), is never blocked.
    """
    tables: set[tuple[str | None, str]] = set()
    columns: set[tuple[str | None, str, str]] = set()
    for op in upgrade_ops.ops:
        if isinstance(op, alembic_ops.DropTableOp):
            tables.add((op.schema, op.table_name))
        elif isinstance(op, alembic_ops.ModifyTableOps):
            for sub in op.ops:
                if isinstance(sub, alembic_ops.DropColumnOp):
                    tables.add((op.schema, op.table_name))
                elif isinstance(sub, alembic_ops.AlterColumnOp) and sub.modify_type is not None:
                    tables.add((op.schema, op.table_name))
                    columns.add((op.schema, op.table_name, sub.column_name))
    return tables, columns


def _short(key: tuple[str | None, str], default_schema: str | None) -> tuple[str | None, str]:
    return (None if key[0] == default_schema else key[0], key[1])


def _strip_view_table_ops(
    upgrade_ops: alembic_ops.UpgradeOps,
    keys: set[tuple[str | None, str]],
    bookkeeping: set[str],
    default_schema: str | None,
) -> None:
    def unwanted(op: Any) -> bool:
        name = getattr(op, "table_name", None)
        if name is None:
            return False
        if name in bookkeeping:
            return True
        schema = getattr(op, "schema", None)
        return (None if schema == default_schema else schema, name) in keys

    upgrade_ops.ops[:] = [op for op in upgrade_ops.ops if not unwanted(op)]


def compare_materialized_views(
    autogen_context: AutogenContext,
    upgrade_ops: alembic_ops.UpgradeOps,
    schemas: set[str | None],
) -> Any:
    """Alembic ``"schema"`` comparator for materialized views (see the module docstring)."""
    result = _continue()
    dialect = autogen_context.dialect
    if dialect is None or dialect.name != "postgresql" or autogen_context.connection is None:
        return result
    # Registered globally and as a plugin, it may be dispatched twice for one migration.
    if upgrade_ops.info.get(_DONE_KEY):
        return result
    upgrade_ops.info[_DONE_KEY] = True

    metadatas = _metadatas(autogen_context)
    if not metadatas:
        return result
    conn = autogen_context.connection
    default_schema = conn.dialect.default_schema_name

    def include(ref: ViewRef) -> bool:
        kind: Any = OBJECT_TYPE
        if ref.reflected:
            names: Any = {"schema_name": ref.schema}
            if not autogen_context.run_name_filters(ref.name, kind, names):
                return False
        table = (
            ref.table
            if ref.table is not None
            else sa.Table(ref.name, sa.MetaData(), schema=ref.schema)
        )
        return autogen_context.run_object_filters(table, ref.name, kind, ref.reflected, None)

    view_keys = _view_table_keys(metadatas, default_schema)
    tables, columns = _altered_tables(upgrade_ops)
    changes = compare.compare_views(
        conn,
        metadatas,
        schemas=schemas,
        include=include,
        altered_tables=[t for t in tables if _short(t, default_schema) not in view_keys],
        retyped_columns=[
            c for c in columns if _short((c[0], c[1]), default_schema) not in view_keys
        ],
    )
    _strip_view_table_ops(upgrade_ops, view_keys, _bookkeeping_tables(), default_schema)
    before = [to_operation(c) for c in changes if c.phase == "before"]
    after = [to_operation(c) for c in changes if c.phase != "before"]
    for change in changes:
        log.info("Detected %s", change)
    upgrade_ops.ops[:0] = before
    upgrade_ops.ops.extend(after)
    return result


def _continue() -> Any:
    try:
        from alembic.util import PriorityDispatchResult
    except ImportError:  # Alembic < 1.18 ignores the return value.
        return None
    return PriorityDispatchResult.CONTINUE


def install(target: Any = None) -> None:
    """Register the comparator on Alembic's global registry (after the table comparator)."""
    from alembic.autogenerate import comparators

    try:
        from alembic.util import DispatchPriority
    except ImportError:
        # Before 1.18, comparators run in registration order, after Alembic's own.
        comparators.dispatch_for("schema")(compare_materialized_views)
        return
    comparators.dispatch_for("schema", priority=DispatchPriority.LAST)(compare_materialized_views)
