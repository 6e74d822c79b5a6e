"""What Alembic's own table comparison must not see: view tables and the library's bookkeeping.

A view's ``Table`` is in the ``MetaData`` (so that queries, the ORM and ``create_all`` work),
and change tracking keeps tables of its own in the database; Alembic's table comparison would
propose ``create_table`` for the first and ``drop_table`` for the second on every run, and
spend time building those operations. Before it runs, :func:`install` adds an
``include_object`` and an ``include_name`` filter to the autogenerate context -- in front of
the project's own, which still apply to everything else -- so that those tables are left out
of the comparison instead of having their operations removed afterwards. Materialized views
are compared by :mod:`~sqlalchemy_matview.alembic.comparator` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..bookkeeping import DEFAULT_SCHEMA, LEGACY_TABLES, is_bookkeeping_table, tracking_schema
from ..compare import is_view_table

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations.ops import UpgradeOps

__all__ = ["BOOKKEEPING_SCHEMA", "LEGACY_BOOKKEEPING_TABLES", "install", "is_bookkeeping"]

#: The schema that holds the library's bookkeeping (change tracking's tables and functions).
BOOKKEEPING_SCHEMA = DEFAULT_SCHEMA
#: Tables that change tracking kept in ``public`` before it had a schema of its own.
LEGACY_BOOKKEEPING_TABLES = LEGACY_TABLES

_INSTALLED = "_sqlalchemy_matview_filters"


def is_bookkeeping(schema: str, name: str, own_schema: str | None = None) -> bool:
    """True for a table of the library's own bookkeeping, which migrations never compare.

    ``schema`` is the table's schema as the catalog names it; ``own_schema`` the tracking
    schema (default ``sqlalchemy_matview``). Decided by
    :func:`~sqlalchemy_matview.bookkeeping.is_bookkeeping_table`.

    >>> is_bookkeeping("public", "sqlalchemy_matview_state")
    True
    >>> is_bookkeeping("public", "orders")
    False
    """
    return is_bookkeeping_table(schema, name, tracking_schema=own_schema)


def _filters(
    default_schema: str, own_schema: str, incremental: frozenset[tuple[str, str]] = frozenset()
) -> tuple[Any, Any]:
    # Incremental views are tables in the catalog; the views' comparator handles them.
    def library_table(schema: str, name: str) -> bool:
        return is_bookkeeping(schema, name, own_schema) or (schema, name) in incremental

    def include_object(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ != "table" or not isinstance(obj, sa.Table):
            return True
        if not reflected:
            return not is_view_table(obj)
        return not library_table(obj.schema or default_schema, obj.name)

    def include_name(name: Any, type_: str, parent_names: Mapping[str, Any]) -> bool:
        if type_ != "table" or name is None:
            return True
        schema = parent_names.get("schema_name") or default_schema
        return not library_table(schema, name)

    return include_object, include_name


def install(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: set[str | None]
) -> Any:
    """Alembic ``"schema"`` comparator that runs first: put the filters in place, and take
    the bookkeeping schema out of ``schemas`` (``include_schemas=True``).

    Idempotent per autogenerate run (it is registered globally and as a plugin).
    """
    from .comparator import continue_result

    if getattr(autogen_context, _INSTALLED, False) or autogen_context.connection is None:
        return continue_result()
    setattr(autogen_context, _INSTALLED, True)
    default_schema = autogen_context.connection.dialect.default_schema_name or "public"
    metadata = autogen_context.metadata
    own = tracking_schema(metadata if isinstance(metadata, sa.MetaData) else None)
    # Everything in it is the library's, and filtering its tables by name is not enough:
    # when every table of a schema is filtered out, Alembic reflects them all at once
    # (an empty filter_names means "all" to SQLAlchemy), with a warning about the log's
    # xid8 column. The same set goes on to Alembic's table comparison.
    schemas.discard(own)
    from ..catalog import installed_incremental_kinds
    from ..incremental import stored_name
    from .comparator import _trusted_bookkeeping

    conn = autogen_context.connection
    trusted = _trusted_bookkeeping(conn, [metadata] if isinstance(metadata, sa.MetaData) else [])
    installed = installed_incremental_kinds(conn, own) if trusted else []
    # A realtime view's rows are in a table of another name (the name itself is a view); a
    # stored view has no such table, and a user's table of that name is compared as usual.
    incremental = frozenset(name for name, _ in installed)
    incremental |= {(s, stored_name(n)) for (s, n), realtime in installed if realtime}
    include_object, include_name = _filters(default_schema, own, incremental)
    # In front, so that the project's own filters never see a view as a table.
    autogen_context._object_filters.insert(0, include_object)
    autogen_context._name_filters.insert(0, include_name)
    return continue_result()


def register_first() -> None:
    """Register :func:`install` on Alembic's global registry, before its table comparison."""
    from alembic.autogenerate import comparators

    try:
        from alembic.util import DispatchPriority
    except ImportError:
        # Before 1.18 comparators run in registration order and Alembic's own table
        # comparison is registered on import: the only way in front is the list itself.
        registered = comparators._registry.setdefault(("schema", "default"), [])
        if install not in registered:
            registered.insert(0, install)
        return
    comparators.dispatch_for("schema", priority=DispatchPriority.FIRST)(install)
