"""The autogenerate comparator: :mod:`sqlalchemy_matview.compare` records turned into ops.

It runs after Alembic's own table comparison (``DispatchPriority.LAST`` on Alembic 1.18+;
registration order on older versions), which never sees a view's ``Table`` nor the
library's bookkeeping tables (:mod:`.filters` keeps them out of it), so that it can

* put view drops before everything else (before the drops of the tables they read) and view
  creates after everything else (after the tables they read are created);
* tell :func:`~sqlalchemy_matview.compare.compare_views` which tables Alembic's operations drop
  or drop columns of, and which columns they give a new type, so that a changed view reading
  one (and an unchanged view reading a retyped column) is dropped before those operations and
  created after them, instead of blocking them.

What it detects is logged as Alembic logs its own findings, on the
``alembic.autogenerate.sqlalchemy_matview`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.operations import ops as alembic_ops

from .. import compare
from ..compare import Change, ViewRef
from ..compare.indexes import renderable_index
from ..schema import check_replace_strategy, materialized_views
from . import filters
from .ops import (
    CreateIncrementalViewOp,
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DependentView,
    DisableChangeTrackingOp,
    DropIncrementalViewOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
    EnableChangeTrackingOp,
    InstallChangeTrackingOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
    UninstallChangeTrackingOp,
)

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = [
    "REPLACE_STRATEGY_OPTION",
    "compare_materialized_views",
    "describe",
    "set_default_replace_strategy",
    "to_operation",
]

#: Under ``alembic``, so that ``alembic revision --autogenerate`` shows what it detected
#: with the default ``alembic.ini`` logging, next to Alembic's own lines.
log = logging.getLogger("alembic.autogenerate.sqlalchemy_matview")

#: ``type_`` given to ``include_object`` / ``include_name`` hooks for materialized views.
OBJECT_TYPE = "materialized_view"

_DONE_KEY = "sqlalchemy_matview.compared"

#: The ``context.configure()`` option choosing the strategy of every replace that the
#: declaration leaves open (``MaterializedView(replace_strategy=None)``): the way to set it
#: for projects that enable the ``sqlalchemy_matview`` plugin rather than call ``register()``.
REPLACE_STRATEGY_OPTION = "sqlalchemy_matview_replace_strategy"

_default_strategy = "drop_create"


def set_default_replace_strategy(strategy: str | None) -> None:
    """The strategy of replaces that neither the view nor the configuration choose
    (``register(replace_strategy=...)``); ``None`` restores ``"drop_create"``.

    Example::

        set_default_replace_strategy("side_by_side")
    """
    global _default_strategy
    _default_strategy = check_replace_strategy(strategy, "register()") or "drop_create"


def _strategy(autogen_context: AutogenContext) -> str:
    chosen = autogen_context.opts.get(REPLACE_STRATEGY_OPTION)
    label = f"context.configure({REPLACE_STRATEGY_OPTION}=...)"
    return check_replace_strategy(chosen, label) or _default_strategy


def to_operation(
    change: Change, default_schema: str | None = None, *, replace_strategy: str = "drop_create"
) -> alembic_ops.MigrateOperation:
    """The Alembic operation that carries out one :mod:`~sqlalchemy_matview.compare` record.

    Views in ``default_schema`` are named without it. ``replace_strategy`` is the strategy of
    a replace whose view does not choose one.
    """
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
        view = change.view
        return ReplaceMaterializedViewOp(
            change.name,
            change.definition,
            schema=change.schema,
            with_data=change.with_data,
            old_definition=change.old_definition,
            columns=change.columns,
            indexes=(view.indexes or None) if view else None,
            comment=view.comment if view else None,
            grants=(view.grants or None) if view else None,
            owner=view.owner if view else None,
            dependents=[
                DependentView.from_captured(d, None if d.schema == default_schema else d.schema)
                for d in change.dependents
            ]
            if view
            else None,
            strategy=change.replace_strategy or replace_strategy,
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
    if isinstance(change, compare.CreateIncremental):
        return CreateIncrementalViewOp(
            change.name,
            change.statements,
            schema=change.schema,
            drop_statements=change.drop_statements,
        )
    if isinstance(change, compare.DropIncremental):
        return DropIncrementalViewOp(
            change.name,
            change.statements,
            schema=change.schema,
            create_statements=change.create_statements,
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


#: What each record is, in the words of Alembic's own log lines.
_DETECTED: dict[type[Any], str] = {
    compare.CreateView: "added materialized view",
    compare.DropView: "removed materialized view",
    compare.ReplaceView: "changed definition of materialized view",
    compare.ChangeComment: "changed comment of materialized view",
    compare.EnableTracking: "added change tracking of materialized view",
    compare.DisableTracking: "removed change tracking of materialized view",
    compare.CreateIncremental: "added incremental view",
    compare.DropIncremental: "removed incremental view",
}


def describe(changes: Sequence[Change], default_schema: str) -> Iterator[str]:
    """One line per change, in Alembic's words (``Detected added materialized view 'public.mv'``).

    An index dropped and created again under the same name is one changed index.
    """

    def name(schema: str | None, view: str) -> str:
        return repr(f"{schema or default_schema}.{view}")

    def index_key(c: compare.CreateIndex | compare.DropIndex) -> tuple[Any, ...]:
        return (c.schema, c.view_name, str(c.index.name))

    dropped = {index_key(c) for c in changes if isinstance(c, compare.DropIndex)}
    created = {index_key(c) for c in changes if isinstance(c, compare.CreateIndex)}
    for change in changes:
        if isinstance(change, (compare.CreateIndex, compare.DropIndex)):
            key = index_key(change)
            if key in dropped and key in created:
                if isinstance(change, compare.DropIndex):
                    continue
                what = "changed"
            else:
                what = "added" if isinstance(change, compare.CreateIndex) else "removed"
            yield (
                f"Detected {what} index {key[2]!r} on materialized view "
                f"{name(change.schema, change.view_name)}"
            )
        elif isinstance(change, compare.DetachView):
            kind = "materialized view" if change.view.kind == "m" else "view"
            yield (
                f"Detected {kind} {name(change.schema, change.name)} to drop before the "
                "changes it would block, and create again after them"
            )
        elif type(change) in _DETECTED:
            yield f"Detected {_DETECTED[type(change)]} {name(change.schema, change.name)}"


def _metadatas(autogen_context: AutogenContext) -> list[sa.MetaData]:
    metadata: Any = autogen_context.metadata
    if metadata is None:
        return []
    if isinstance(metadata, sa.MetaData):
        return [metadata]
    return list(metadata)


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


def compare_materialized_views(
    autogen_context: AutogenContext,
    upgrade_ops: alembic_ops.UpgradeOps,
    schemas: set[str | None],
) -> Any:
    """Alembic ``"schema"`` comparator for materialized views (see the module docstring)."""
    result = continue_result()
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

    tables, columns = _altered_tables(upgrade_ops)
    changes = compare.compare_views(
        conn,
        metadatas,
        trusted_bookkeeping=_trusted_bookkeeping(conn, metadatas),
        schemas=schemas,
        include=include,
        altered_tables=tables,
        retyped_columns=columns,
    )
    strategy = _strategy(autogen_context)
    before = [
        to_operation(c, default_schema, replace_strategy=strategy)
        for c in changes
        if c.phase == "before"
    ]
    after = [
        to_operation(c, default_schema, replace_strategy=strategy)
        for c in changes
        if c.phase != "before"
    ]
    for message in describe(changes, default_schema or "public"):
        log.info(message)
    _bookkeeping_ops(conn, metadatas, before, after)
    upgrade_ops.ops[:0] = before
    upgrade_ops.ops.extend(after)
    return result


def _trusted_bookkeeping(conn: Any, metadatas: list[sa.MetaData]) -> bool:
    """Whether the bookkeeping schema (where incremental views' objects live) is owned by
    roles the current one trusts: only then are its objects read into migrations."""
    from ..bookkeeping import tracking_schema
    from ..orchestration import tracking

    own = tracking_schema(metadatas[0]) if metadatas else tracking_schema()
    return tracking.bookkeeping_inventory(conn, own).exists


def _bookkeeping_ops(
    conn: Any, metadatas: list[sa.MetaData], before: list[Any], after: list[Any]
) -> None:
    """The bookkeeping is migrated, not implied: install it in front of the first
    ``enable_change_tracking`` of a database that has none, and remove it after the
    ``disable_change_tracking`` of the last tracked view (its reverse then installs it
    again, and ``alembic downgrade base`` leaves nothing of the library behind)."""
    from ..bookkeeping import DEFAULT_SCHEMA, tracking_schema

    ops = before + after
    own = tracking_schema(metadatas[0]) if metadatas else DEFAULT_SCHEMA
    schema = None if own == DEFAULT_SCHEMA else own
    for op in ops:
        # A replace keeps a tracked view's tracking, in whichever schema holds it.
        if isinstance(
            op, (EnableChangeTrackingOp, DisableChangeTrackingOp, ReplaceMaterializedViewOp)
        ):
            op.tracking_schema = schema
    # An incremental view's log and functions live in the bookkeeping schema too.
    needs = (EnableChangeTrackingOp, CreateIncrementalViewOp)
    enables = any(isinstance(o, needs) for o in ops)
    disables = any(isinstance(o, DisableChangeTrackingOp) for o in ops)
    if not (enables or disables):
        return
    from ..orchestration import tracking

    installed = tracking.bookkeeping_installed(conn, own)
    if enables and not installed:
        for phase in (before, after):
            first = next((i for i, o in enumerate(phase) if isinstance(o, needs)), None)
            if first is not None:
                phase.insert(first, InstallChangeTrackingOp(schema=schema))
                return
    still_tracked = any(
        v.track_changes or v.incremental is not None
        for md in metadatas
        for v in materialized_views(md, managed=True)
    )
    if disables and installed and not still_tracked:
        for phase in (after, before):
            last = max(
                (i for i, o in enumerate(phase) if isinstance(o, DisableChangeTrackingOp)),
                default=None,
            )
            if last is not None:
                phase.insert(last + 1, UninstallChangeTrackingOp(schema=schema))
                return


def continue_result() -> Any:
    try:
        from alembic.util import PriorityDispatchResult
    except ImportError:  # Alembic < 1.18 ignores the return value.
        return None
    return PriorityDispatchResult.CONTINUE


def install(target: Any = None) -> None:
    """Register the comparators on Alembic's global registry: the filters before Alembic's
    table comparison (:mod:`.filters`), the views after it."""
    from alembic.autogenerate import comparators

    filters.register_first()
    try:
        from alembic.util import DispatchPriority
    except ImportError:
        # Before 1.18, comparators run in registration order, after Alembic's own.
        comparators.dispatch_for("schema")(compare_materialized_views)
        return
    comparators.dispatch_for("schema", priority=DispatchPriority.LAST)(compare_materialized_views)
