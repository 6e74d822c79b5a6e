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


def register() -> None:
    """Make Alembic aware of materialized views: operations, renderers, filters, comparator.

    Idempotent: calling it again (say, once per ``env.py`` run in a test suite) does nothing.

    Example::

        import sqlalchemy_matview.alembic
        sqlalchemy_matview.alembic.register()
    """
    global _registered
    with _lock:
        if _registered:
            return
        from . import comparator, ops, render  # noqa: F401  (ops and renderers register here)

        comparator.install()
        _registered = True
