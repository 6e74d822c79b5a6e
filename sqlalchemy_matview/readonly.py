"""Guards that keep materialized views read-only and make ``refresh()`` see pending ORM work.

Installed once, the first time a view is declared or a refresh is built, never at import:

- a ``before_flush`` hook on every ``Session`` refuses inserts, updates and deletes of objects
  mapped to a materialized view, before the flush sends any SQL;
- ``INSERT`` / ``UPDATE`` / ``DELETE`` compilation refuses a view's ``Table`` (Core DML would
  otherwise reach the server and fail there with a less helpful message);
- a ``do_orm_execute`` hook flushes a session's pending changes before a
  ``REFRESH MATERIALIZED VIEW`` runs: SQLAlchemy 2.1 autoflushes there, 2.0 does not;
- a ``handle_error`` hook turns the server's refusal of ``REFRESH ... CONCURRENTLY`` on a view
  that was never populated into a :class:`~sqlalchemy_matview.errors.ConcurrentRefreshError`
  that says what to do (only the server knows whether a view is populated).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.sql import dml
from sqlalchemy.sql.compiler import SQLCompiler

from .errors import ConcurrentRefreshError, ReadOnlyMaterializedViewError, StandbyError
from .schema import INFO_KEY, MaterializedView

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Install the guards (idempotent and thread-safe)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        event.listen(Session, "before_flush", _refuse_view_writes)
        event.listen(Session, "do_orm_execute", _flush_before_refresh)
        event.listen(sa.engine.Engine, "handle_error", _explain_unpopulated)
        event.listen(sa.engine.Engine, "handle_error", _explain_standby)
        for cls, visit in (
            (dml.Insert, "visit_insert"),
            (postgresql.Insert, "visit_insert"),
            (dml.Update, "visit_update"),
            (dml.Delete, "visit_delete"),
        ):
            _guard_dml(cls, visit)
        _installed = True


def _view_of_table(table: Any) -> MaterializedView | None:
    info = getattr(table, "info", None)
    view = info.get(INFO_KEY) if info else None
    return view if isinstance(view, MaterializedView) else None


def _refuse(view: MaterializedView, verb: str) -> ReadOnlyMaterializedViewError:
    return ReadOnlyMaterializedViewError(
        f"cannot {verb} materialized view {view.fullname!r}: its rows are the stored result of "
        "its query; change the tables it reads from, then refresh it "
        "(session.execute(refresh(view)))"
    )


# Mapper -> the view it maps (or None). Looked up once per mapper: this runs on every flush.
_mapped_views: weakref.WeakKeyDictionary[Mapper[Any], MaterializedView | None] = (
    weakref.WeakKeyDictionary()
)


def _view_of_mapper(mapper: Mapper[Any]) -> MaterializedView | None:
    try:
        return _mapped_views[mapper]
    except KeyError:
        views = (_view_of_table(t) for t in mapper.tables)
        found = _mapped_views[mapper] = next((v for v in views if v is not None), None)
        return found


def _refuse_view_writes(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    for verb, objects in (
        ("insert into", session.new),
        ("delete from", session.deleted),
        ("update", session.dirty),
    ):
        for obj in objects:
            view = _view_of_mapper(sa.inspect(obj).mapper)
            if view is None or (verb == "update" and not session.is_modified(obj)):
                continue
            raise _refuse(view, verb)


def _flush_before_refresh(state: ORMExecuteState) -> None:
    from .ddl import RefreshMaterializedView

    session = state.session
    # Checked first: this hook runs for every statement a Session executes.
    if not isinstance(state.statement, RefreshMaterializedView) or not session.autoflush:
        return
    if session.new or session.dirty or session.deleted:
        session.flush()


def _explain_unpopulated(context: sa.engine.ExceptionContext) -> BaseException | None:
    from .ddl import RefreshMaterializedView, _label

    compiled = getattr(context.execution_context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    if not isinstance(statement, RefreshMaterializedView) or not statement.concurrently:
        return None
    error = context.original_exception
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if code != "0A000" or "not populated" not in str(error):
        return None
    return ConcurrentRefreshError(
        f"refresh({_label(statement)}): the view has never been populated (created WITH NO "
        "DATA), and REFRESH ... CONCURRENTLY needs a populated view; refresh it once with "
        "refresh(view, concurrently=False), or use refresh_views(bind, view), whose "
        "concurrently='auto' does that by itself"
    )


def _in_hot_standby(dbapi_connection: Any) -> bool:
    """What the server last reported in ``in_hot_standby`` (PostgreSQL 14+ reports it to
    every client on its own, so nothing needs to be asked of a failed transaction)."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    info = getattr(driver, "info", None)
    if info is not None and hasattr(info, "parameter_status"):  # psycopg
        return bool(info.parameter_status("in_hot_standby") == "on")
    if hasattr(driver, "get_settings"):  # asyncpg
        return bool(getattr(driver.get_settings(), "in_hot_standby", None) == "on")
    return False


def _explain_standby(context: sa.engine.ExceptionContext) -> BaseException | None:
    from .ddl import RefreshMaterializedView, _label

    compiled = getattr(context.execution_context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    if not isinstance(statement, RefreshMaterializedView):
        return None
    error = context.original_exception
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    connection = context.connection
    if code != "25006" or connection is None:
        return None
    try:
        standby = _in_hot_standby(connection.connection.dbapi_connection)
    except Exception:  # an unknown driver: keep the server's own message
        return None
    if not standby:
        return None
    return StandbyError(
        f"refresh({_label(statement)}): the server is a hot standby, which is read-only and "
        "cannot refresh materialized views; refresh on the primary: the standby's readers "
        "see the result once it is replayed"
    )


def _guard_dml(cls: type, visit: str) -> None:
    verb = {"visit_insert": "insert into", "visit_update": "update", "visit_delete": "delete from"}[
        visit
    ]

    @compiles(cls)
    def _visit(element: Any, compiler: SQLCompiler, **kw: Any) -> str:
        view = _view_of_table(element.table)
        if view is not None:
            raise _refuse(view, verb)
        result: str = getattr(compiler, visit)(element, **kw)
        return result
