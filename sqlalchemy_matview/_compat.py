"""The one place that knows how SQLAlchemy 2.0 and 2.1 differ for us.

SQLAlchemy 2.1 lets a ``Table`` carry its own creation and removal DDL
(``Table.set_creator_ddl`` / ``set_dropper_ddl``, the mechanism behind its native
``CreateView``); there we use it and touch nothing global. SQLAlchemy 2.0 has no such hook,
so ``CREATE TABLE`` / ``DROP TABLE`` compilation is wrapped once, and the wrapper hands any
table that is not one of our views straight back to the dialect's own compiler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateTable, DropTable
from sqlalchemy.sql.compiler import DDLCompiler

if TYPE_CHECKING:
    from .schema import MaterializedView

#: True on SQLAlchemy 2.1+, whose ``Table`` accepts creator / dropper DDL.
HAS_TABLE_DDL_HOOKS = hasattr(sa.Table, "set_creator_ddl")

_table_compilers_wrapped = False


def install_ddl(view: MaterializedView) -> None:
    """Make ``create_all`` / ``drop_all`` emit the view's DDL for ``view.table``."""
    from .ddl import (
        CommentOnMaterializedView,
        CreateIncrementalTable,
        CreateMaterializedView,
        DropIncrementalStorage,
        DropMaterializedView,
    )

    table = view.table
    if view.incremental is not None:
        # A real table: SQLAlchemy's own DROP TABLE; only its creation differs. A realtime
        # one is a view over a table of another name: the view goes in before_drop.
        # The comment is set once everything exists (orchestration.incremental).
        if HAS_TABLE_DDL_HOOKS:
            table.set_creator_ddl(cast(Any, CreateIncrementalTable(view)))
            if view.incremental.realtime:
                table.set_dropper_ddl(cast(Any, DropIncrementalStorage(view)))
        else:
            _wrap_table_compilers()
        return
    if HAS_TABLE_DDL_HOOKS:
        table.set_creator_ddl(cast(Any, CreateMaterializedView(view)))
        table.set_dropper_ddl(cast(Any, DropMaterializedView(view)))
    else:
        _wrap_table_compilers()
    if view.comment is not None:
        sa.event.listen(table, "after_create", CommentOnMaterializedView(view))


def _view_of(table: Any) -> MaterializedView | None:
    from .schema import materialized_view_of

    return materialized_view_of(table) if isinstance(table, sa.Table) else None


def _wrap_table_compilers() -> None:
    global _table_compilers_wrapped
    if _table_compilers_wrapped:
        return
    _table_compilers_wrapped = True
    from .ddl import (
        CreateIncrementalTable,
        CreateMaterializedView,
        DropIncrementalStorage,
        DropMaterializedView,
    )

    @compiles(CreateTable)
    def _create_table(element: CreateTable, compiler: DDLCompiler, **kw: Any) -> str:
        view = _view_of(element.element)
        if view is None:
            return str(compiler.visit_create_table(element, **kw))  # type: ignore[no-untyped-call]
        if_not_exists = bool(getattr(element, "if_not_exists", False))
        create: Any
        if view.incremental is not None:
            create = CreateIncrementalTable(view, if_not_exists=if_not_exists)
        else:
            create = CreateMaterializedView(view, if_not_exists=if_not_exists)
        return compiler.process(create, **kw)

    @compiles(DropTable)
    def _drop_table(element: DropTable, compiler: DDLCompiler, **kw: Any) -> str:
        view = _view_of(element.element)
        if view is not None and view.incremental is not None and view.incremental.realtime:
            storage = DropIncrementalStorage(
                view, if_exists=bool(getattr(element, "if_exists", False))
            )
            return compiler.process(storage, **kw)
        if view is None or view.incremental is not None:
            return str(compiler.visit_drop_table(element, **kw))  # type: ignore[no-untyped-call]
        drop = DropMaterializedView(view, if_exists=bool(getattr(element, "if_exists", False)))
        return compiler.process(drop, **kw)
