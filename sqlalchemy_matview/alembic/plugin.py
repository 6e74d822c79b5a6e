"""The ``sqlalchemy_matview`` Alembic plugin (Alembic 1.18+).

Published through the ``alembic.plugins`` entry point, so Alembic loads it on import; its
comparator only runs in projects that enable it::

    context.configure(
        ...,
        autogenerate_plugins=["alembic.autogenerate.*", "sqlalchemy_matview"],
    )

Alembic imports this module while it is itself half imported, so nothing from Alembic is
imported here at module level: the comparator, the operations and their renderers are loaded
the first time the comparator runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.runtime.plugins import Plugin

__all__ = ["setup"]


def compare_materialized_views(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> Any:
    """Load the comparator (and the operations it emits) and run it."""
    from . import render  # noqa: F401  (registers the renderers)
    from .comparator import compare_materialized_views as compare

    return compare(autogen_context, upgrade_ops, schemas)


def install_filters(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> Any:
    """Keep view tables and bookkeeping out of Alembic's table comparison (runs first)."""
    from .filters import install

    return install(autogen_context, upgrade_ops, schemas)


def setup(plugin: Plugin) -> None:
    """Called by Alembic with the :class:`~alembic.runtime.plugins.Plugin` to fill in."""
    from alembic.util import DispatchPriority

    plugin.add_autogenerate_comparator(install_filters, "schema", priority=DispatchPriority.FIRST)
    plugin.add_autogenerate_comparator(
        compare_materialized_views, "schema", priority=DispatchPriority.LAST
    )
