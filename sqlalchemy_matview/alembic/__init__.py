"""Alembic support: autogenerate, operations and rendering for materialized views.

Add one line to ``env.py`` (before ``context.configure``)::

    import sqlalchemy_matview.alembic
    sqlalchemy_matview.alembic.register()

From then on ``alembic revision --autogenerate`` creates, replaces and drops materialized views
and their indexes, Alembic's own table comparison leaves view tables and the library's
bookkeeping alone (:mod:`~sqlalchemy_matview.alembic.filters`), and migrations can use
``op.create_materialized_view``,
``op.drop_materialized_view``, ``op.replace_materialized_view``,
``op.refresh_materialized_view``, ``op.set_materialized_view_comment``,
``op.enable_change_tracking`` and ``op.disable_change_tracking``.

On Alembic 1.18+ the same comparator is also available as the ``sqlalchemy_matview`` plugin
(``autogenerate_plugins=["alembic.autogenerate.*", "sqlalchemy_matview"]``); using both is
harmless.

Importing this package changes nothing; :func:`register` does the registration.
"""

from __future__ import annotations

import threading

__all__ = ["register"]

_lock = threading.Lock()
_registered = False


def register(*, replace_strategy: str | None = None) -> None:
    """Make Alembic aware of materialized views: operations, renderers, filters, comparator.

    Idempotent: calling it again (say, once per ``env.py`` run in a test suite) installs
    nothing more.

    ``replace_strategy`` is how autogenerate replaces a view whose definition changed, when
    the view does not say (``MaterializedView(replace_strategy=...)``): ``"drop_create"``
    (the default) or ``"side_by_side"`` (see
    :meth:`~sqlalchemy_matview.alembic.ops.ReplaceMaterializedViewOp.replace_materialized_view`).
    A call that passes it sets it for the process (``None`` leaves it as it is); projects
    using the Alembic plugin instead of ``register()`` pass
    ``sqlalchemy_matview_replace_strategy=...`` to ``context.configure()``, which wins over it.

    Example::

        import sqlalchemy_matview.alembic
        sqlalchemy_matview.alembic.register(replace_strategy="side_by_side")
    """
    global _registered
    from ..schema import check_replace_strategy

    check_replace_strategy(replace_strategy, "register()")
    with _lock:
        from . import comparator, ops, render  # noqa: F401  (ops and renderers register here)

        if replace_strategy is not None:
            comparator.set_default_replace_strategy(replace_strategy)
        if _registered:
            return
        comparator.install()
        _registered = True
