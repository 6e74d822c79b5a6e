"""Refreshing views: :func:`refresh_views`, :func:`refresh_all`, :func:`refresh_stale`.

Each view is refreshed in its own transaction (or savepoint, inside a caller's
transaction) which applies ``lock_timeout`` / ``statement_timeout`` with
``set_config(..., is_local)`` and then, where the bookkeeping tables exist, runs the
database function ``sqlalchemy_matview.refresh()`` (the one pg_cron jobs run, see
:func:`~sqlalchemy_matview.orchestration.tracking.refresh_call`), which in order:

1. takes the view's advisory lock (:func:`~sqlalchemy_matview.lock_key`), or skips;
2. for :func:`refresh_stale`, checks again under the lock that the view is still stale
   (another process may have refreshed it a moment ago);
3. runs ``REFRESH MATERIALIZED VIEW [CONCURRENTLY]``;
4. clears the changes that the refresh's snapshot covered, records when and how long, and
   marks the materialized views that read this one stale; changes committed during the
   refresh are reported as :attr:`RefreshResult.pending`.

Without the bookkeeping tables (no view tracks changes) steps 1 and 3 run from Python.

Nothing is raised for a refresh that fails: it is reported as a :class:`RefreshResult`,
logged on the ``sqlalchemy_matview`` logger, and the views depending on it are skipped.
Misuse (an unknown view name, a bad option) raises before any refresh is sent.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Literal, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..bookkeeping import tracking_schema
from ..ddl import RefreshMaterializedView, qualifying_unique_index
from ..errors import ConcurrentRefreshError, MaterializedViewError, UnknownViewError
from ..schema import MaterializedView, materialized_view_of, materialized_views
from . import history, incremental, plan_reads, tracking
from .locking import check_namespace, lock_key
from .ordering import DependencyGraph, QName
from .pooling import standby_error
from .results import RefreshResult, RefreshStatus

__all__ = [
    "Bind",
    "LockMode",
    "RefreshOptionError",
    "RunOptions",
    "Timeout",
    "ViewRef",
    "refresh_all",
    "refresh_stale",
    "refresh_views",
    "run_metadata",
    "run_options",
    "run_views",
]

log = logging.getLogger("sqlalchemy_matview")

Bind: TypeAlias = Engine | Connection | Session
#: A view: the declaration, its ``Table``, an ORM class mapped to it, a name, or
#: ``(schema, name)``.
ViewRef: TypeAlias = MaterializedView | sa.Table | type | str | tuple[str | None, str]
LockMode: TypeAlias = Literal["skip", "wait", "none"]
#: Seconds (``int`` / ``float``), a ``timedelta``, or a PostgreSQL duration string ("5s").
Timeout: TypeAlias = float | int | timedelta | str | None


class RefreshOptionError(MaterializedViewError, ValueError):
    """An option of ``refresh_views`` / ``refresh_all`` / ``refresh_stale`` is invalid."""


@dataclass(frozen=True)
class RunOptions:
    """The validated options of one run (built by :func:`run_options`)."""

    cascade: bool
    concurrently: bool | Literal["auto"]
    lock: LockMode
    lock_timeout: str | None
    statement_timeout: str | None
    #: Salt of the advisory-lock keys (see :func:`~sqlalchemy_matview.lock_key`).
    lock_namespace: str | None = None


def _timeout(name: str, value: Timeout) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RefreshOptionError(f"{name} takes seconds, a timedelta or a string, not a bool")
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)):
        if value < 0:
            raise RefreshOptionError(f"{name}={value!r}: a timeout cannot be negative")
        if not math.isfinite(value):
            raise RefreshOptionError(
                f"{name}={value!r}: pass a finite number of seconds, or None for no timeout"
            )
        return f"{round(value * 1000)}ms"
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise RefreshOptionError(
        f"{name}={value!r}: pass seconds (2.5), a timedelta, or a PostgreSQL duration ('5s')"
    )


def run_options(
    cascade: bool,
    concurrently: bool | Literal["auto"],
    lock: str,
    lock_timeout: Timeout,
    statement_timeout: Timeout,
    lock_namespace: str | None = None,
) -> RunOptions:
    """Validate the options shared by every refresh function, before any SQL is sent."""
    if concurrently not in (True, False, "auto"):
        raise RefreshOptionError(f"concurrently={concurrently!r}: pass 'auto', True or False")
    if lock not in ("skip", "wait", "none"):
        raise RefreshOptionError(
            f"lock={lock!r}: pass 'skip' (skip views another process is refreshing), "
            "'wait' (wait for it, bounded by lock_timeout) or 'none' (take no lock)"
        )
    return RunOptions(
        cascade=bool(cascade),
        concurrently=concurrently,
        lock=lock,  # type: ignore[arg-type]
        lock_timeout=_timeout("lock_timeout", lock_timeout),
        statement_timeout=_timeout("statement_timeout", statement_timeout),
        lock_namespace=_namespace(lock_namespace),
    )


def _namespace(value: object) -> str | None:
    try:
        return check_namespace(value)
    except MaterializedViewError as exc:
        raise RefreshOptionError(str(exc)) from None


# -- binds and transactions ------------------------------------------------------------


class OwnedConnection:
    """A ``Connection`` handed over with Engine semantics: each view commits on its own.

    Used by :mod:`sqlalchemy_matview.asyncio`, whose ``run_sync`` yields a Connection.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn


@contextmanager
def _connection(bind: Bind | OwnedConnection) -> Iterator[tuple[Connection, bool]]:
    """``(connection, owned)``: owned connections commit each view on their own."""
    if isinstance(bind, OwnedConnection):
        yield bind.conn, True
    elif isinstance(bind, Engine):
        with bind.connect() as conn:
            yield conn, True
    elif isinstance(bind, Connection):
        yield bind, False
    elif isinstance(bind, Session):
        bind.flush()  # the refresh must see the session's pending changes
        yield bind.connection(), False
    else:
        raise TypeError(
            "refresh functions take an Engine, a Connection or a Session; for AsyncEngine, "
            "AsyncConnection or AsyncSession use sqlalchemy_matview.asyncio; "
            f"got {type(bind).__name__}"
        )


@contextmanager
def _transaction(conn: Connection, owned: bool) -> Iterator[None]:
    if owned:
        if conn.in_transaction():
            # The plan's reads began it (see _run): the first view refreshed commits them
            # with its own work, one BEGIN/COMMIT round trip fewer.
            with conn.get_transaction():  # type: ignore[union-attr]
                yield
            return
        with conn.begin():
            yield
    else:
        with conn.begin_nested():
            yield


def _statements_commit_alone(conn: Connection, owned: bool) -> bool:
    """Whether the run may send its reads, and refreshes made of one statement, without
    BEGIN and COMMIT: a connection of its own (each view commits anyway) whose isolation
    level nobody chose for it (an Engine's reset_isolation_level gives that level back)."""
    return owned and "isolation_level" not in conn.get_execution_options()


@contextmanager
def _alone(conn: Connection, on: bool) -> Iterator[None]:
    """Statements sent meanwhile are transactions of their own (the driver's autocommit):
    no BEGIN and no COMMIT round trip, two of the four a one-statement refresh cost with
    its plan. Nothing is rolled back either, and a ROLLBACK makes psycopg deallocate its
    prepared statements: the plan's statement was parsed and planned anew (1-2 ms) after
    every run that only read. Only for reads and for refreshes that are one statement:
    anything that must be atomic runs outside."""
    if not on:
        yield
        return
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    conn.dialect.set_isolation_level(dbapi, "AUTOCOMMIT")
    try:
        yield
    finally:
        conn.dialect.reset_isolation_level(dbapi)


# -- planning ----------------------------------------------------------------------------


@dataclass
class _Item:
    qname: QName
    declared: MaterializedView | None = None
    exists: bool = True
    populated: bool = True
    concurrent_index: bool = False
    #: An incremental view: a table whose dirty buckets are recomputed.
    incremental: bool = False

    @property
    def label(self) -> str:
        return f"{self.qname[0]}.{self.qname[1]}"


@dataclass
class _Plan:
    items: list[_Item]
    graph: DependencyGraph
    tracking_on: bool
    stale: set[QName] = field(default_factory=set)
    tracking_schema: str | None = None
    #: Refreshes that are one statement run as a transaction of their own (see _alone).
    alone: bool = False


def _qualify(view: MaterializedView, current: str) -> QName:
    return (view.schema or current, view.name)


def _declared_edges(views: Sequence[MaterializedView], current: str) -> list[tuple[QName, QName]]:
    edges: list[tuple[QName, QName]] = []
    for view in views:
        for source in view.sources:
            upstream = materialized_view_of(source)
            if upstream is not None and upstream is not view:
                edges.append((_qualify(view, current), _qualify(upstream, current)))
    return edges


def _candidates(ref: ViewRef, declared: MaterializedView | None) -> list[plan_reads.Candidate]:
    """The names ``ref`` may resolve to, ``None`` standing for the current schema (a
    ``"a.b"`` string is a view named so in the current schema, else ``b`` in ``a``)."""
    if declared is not None:
        return [(declared.schema, declared.name, declared.incremental is not None)]
    if isinstance(ref, tuple) and len(ref) == 2 and isinstance(ref[1], str):
        return [(ref[0] or None, ref[1], True)]
    if isinstance(ref, str) and ref:
        if "." not in ref:
            return [(None, ref, True)]
        schema, _, name = ref.partition(".")
        return [(None, ref, True), (schema, name, True)]
    raise TypeError(
        "views are MaterializedView objects, their Tables, ORM classes mapped to them, "
        f"names or (schema, name) tuples; got {ref!r}"
    )


def _resolve(
    ref: ViewRef, declared: MaterializedView | None, current: str, known: Container[QName]
) -> QName:
    """The ``(schema, name)`` of ``ref``; ``known``: the names found in the database."""
    if declared is not None:
        return _qualify(declared, current)
    if isinstance(ref, str) and "." in ref and (current, ref) not in known:
        schema, _, name = ref.partition(".")
        return (schema, name)
    given, name, _ = _candidates(ref, None)[0]
    return (given or current, name)


def _check_concurrent_declaration(view: MaterializedView) -> None:
    if not view.unique_key and qualifying_unique_index(view.table) is None:
        raise ConcurrentRefreshError(
            f"materialized view {view.fullname!r} cannot be refreshed with concurrently=True: "
            "it has no unique index on plain columns without a WHERE clause; declare "
            "unique_key='column', or pass concurrently='auto' or False"
        )


def _plan(
    conn: Connection,
    refs: Sequence[ViewRef],
    metadata: sa.MetaData | None,
    opts: RunOptions,
    *,
    strict: bool,
    want_stale: bool,
    what: str,
) -> _Plan:
    declared = [materialized_view_of(ref) for ref in refs]
    per_ref = [_candidates(ref, view) for ref, view in zip(refs, declared, strict=True)]
    candidates = [c for cs in per_ref for c in cs]
    for view in declared:
        if view is not None and opts.concurrently is True and view.incremental is None:
            _check_concurrent_declaration(view)
    declared_views = materialized_views(metadata) if metadata is not None else []
    schema = _bookkeeping_schema(metadata, [v for v in declared if v is not None])
    # One view refreshed alone needs no order: spare the scan of pg_depend.
    alone = not opts.cascade and len({tuple(cs) for cs in per_ref}) == 1
    # One statement for every fact the plan needs (see plan_reads). Without definitions the
    # catalog read takes no locks, so planning never waits behind a plain refresh elsewhere.
    reads = plan_reads.read_plan(
        conn, candidates, schema, all_matviews=opts.cascade, dependencies=not alone
    )
    if reads.in_recovery:
        raise standby_error(what)
    current = reads.current_schema
    infos = reads.matviews
    resolved: list[tuple[QName, MaterializedView | None]] = [
        (_resolve(ref, view, current, infos), view)
        for ref, view in zip(refs, declared, strict=True)
    ]
    bookkeeping = reads.inventory
    # Incremental views are tables, not in pg_matviews: their refresh function says they exist,
    # in a bookkeeping schema that only trusted roles own (else it may be a squatter's).
    incrementals = {
        q
        for q, view in resolved
        if bookkeeping.exists
        and q not in infos
        and (view is None or view.incremental is not None)
        and q in reads.refresh_functions
    }
    missing = [q for q, _ in resolved if q not in infos and q not in incrementals]
    if strict and missing:
        names = ", ".join(f"'{s}.{n}'" for s, n in missing)
        raise UnknownViewError(
            f"no materialized view {names} in the database (search_path schema "
            f"{current!r}); create it first (metadata.create_all / alembic upgrade) or "
            "check the name"
        )
    extra = _declared_edges([v for _, v in resolved if v is not None] + declared_views, current)
    graph = DependencyGraph.from_catalog(reads.dependencies, extra)
    wanted: dict[QName, MaterializedView | None] = {}
    for qname, view in resolved:
        if wanted.get(qname) is None:
            wanted[qname] = view
    if opts.cascade:
        for qname in sorted(graph.downstream(wanted)):
            if qname in infos or qname in wanted:
                wanted.setdefault(qname, None)
    items: list[_Item] = []
    for qname in graph.order(list(wanted)):
        info = infos.get(qname)
        items.append(
            _Item(
                qname=qname,
                declared=wanted[qname],
                exists=info is not None or qname in incrementals,
                populated=info[0] if info is not None else qname in incrementals,
                concurrent_index=bool(info and info[1]),
                incremental=qname in incrementals,
            )
        )
    tracking_on = bookkeeping.current
    # Incremental views keep their own log: no need to ask the change log when only they run.
    materialized = any(not item.incremental for item in items)
    stale = (
        tracking.stale_views(conn, schema)
        if (tracking_on and want_stale and materialized)
        else set()
    )
    if want_stale and incrementals:
        stale |= incremental.dirty_views(conn, sorted(incrementals), schema)
    return _Plan(
        items=items, graph=graph, tracking_on=tracking_on, stale=stale, tracking_schema=schema
    )


def _bookkeeping_schema(metadata: sa.MetaData | None, declared: Sequence[MaterializedView]) -> str:
    """The tracking schema of the run: its MetaData's, else its declared views'."""
    if metadata is not None:
        return tracking_schema(metadata)
    for view in declared:
        return tracking_schema(view.metadata)
    return tracking_schema()


# -- one view ----------------------------------------------------------------------------


def _set_timeouts(conn: Connection, opts: RunOptions, owned: bool) -> dict[str, str]:
    """Apply the run's timeouts to this transaction (one statement); the values they
    replace, when the caller's transaction must get them back (see _restore_timeouts)."""
    given = [
        (name, value)
        for name, value in (
            ("lock_timeout", opts.lock_timeout),
            ("statement_timeout", opts.statement_timeout),
        )
        if value is not None
    ]
    if not given:
        return {}
    saved: dict[str, str] = {}
    if not owned:  # a transaction of our own ends them itself
        row = conn.execute(sa.select(*(sa.func.current_setting(n) for n, _ in given))).one()
        saved = {n: str(old) for (n, _), old in zip(given, row, strict=True)}
    conn.execute(sa.select(*(sa.func.set_config(n, v, True) for n, v in given)))
    return saved


def _restore_timeouts(conn: Connection, saved: dict[str, str]) -> None:
    # SET LOCAL outlives a released savepoint, so a caller's transaction gets its values back.
    if saved:
        conn.execute(sa.select(*(sa.func.set_config(n, v, True) for n, v in saved.items())))


def _use_concurrently(item: _Item, opts: RunOptions) -> bool | ConcurrentRefreshError:
    possible = item.populated and item.concurrent_index
    if opts.concurrently == "auto":
        return possible
    if opts.concurrently is False:
        return False
    if possible:
        return True
    why = (
        "it is not populated (created WITH NO DATA); refresh it once with concurrently=False"
        if not item.populated
        else "it has no qualifying unique index in the database; create one (unique_key=)"
    )
    return ConcurrentRefreshError(
        f"materialized view '{item.label}' cannot be refreshed with concurrently=True: {why}, "
        "or pass concurrently='auto'"
    )


def _is_lock_timeout(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "55P03"


def _refresh_untracked(conn: Connection, item: _Item, concurrently: bool, opts: RunOptions) -> str:
    """Lock and refresh where the bookkeeping (and its refresh function) is not installed.

    The same steps as ``tracking.REFRESH_FUNCTION`` minus the recording; a timed-out wait
    for the lock is told apart from a timed-out REFRESH by the statement that raised.
    """
    key = sa.literal(lock_key(item.qname, namespace=opts.lock_namespace), sa.BigInteger)
    if opts.lock == "skip":
        if not conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(key))).scalar():
            return "skipped_locked"
    elif opts.lock == "wait":
        try:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        except sa.exc.DBAPIError as exc:
            if _is_lock_timeout(exc):
                raise _LockWaitTimeout(exc) from exc
            raise
    schema, name = item.qname
    conn.execute(RefreshMaterializedView(name, schema=schema, concurrently=concurrently))
    return "refreshed"


_OUTCOMES: dict[str, RefreshStatus] = {
    "refreshed": "refreshed",
    "skipped_locked": "skipped_locked",
    "skipped_fresh": "skipped_fresh",
    "refreshed_pending": "refreshed",
}


class _LockWaitTimeout(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _refresh_one(
    conn: Connection,
    owned: bool,
    item: _Item,
    plan: _Plan,
    opts: RunOptions,
    *,
    only_if_stale: bool,
) -> RefreshResult:
    started = time.perf_counter()

    def result(
        status: RefreshStatus, concurrently: bool = False, error: BaseException | None = None
    ) -> RefreshResult:
        return RefreshResult(
            view=item.label,
            status=status,
            concurrently=concurrently,
            duration=time.perf_counter() - started,
            error=error,
        )

    if not item.exists:
        return result(
            "failed",
            error=UnknownViewError(
                f"materialized view '{item.label}' does not exist in the database; create "
                "it (metadata.create_all / alembic upgrade)"
            ),
        )
    if item.incremental:
        return _refresh_incremental(conn, owned, item, plan, opts, only_if_stale, result)
    concurrently = _use_concurrently(item, opts)
    if isinstance(concurrently, ConcurrentRefreshError):
        return result("failed", error=concurrently)
    schema, name = item.qname
    try:
        with _transaction(conn, owned):
            saved = _set_timeouts(conn, opts, owned)
            if plan.tracking_on:
                # Lock, staleness check, refresh and bookkeeping in one statement: the same
                # function pg_cron jobs run.
                status = tracking.refresh_and_record(
                    conn,
                    schema,
                    name,
                    concurrently=concurrently,
                    lock=opts.lock,
                    only_if_stale=only_if_stale,
                    lock_namespace=opts.lock_namespace,
                    tracking_schema_name=plan.tracking_schema,
                )
            elif only_if_stale:
                status = "skipped_fresh"
            else:
                status = _refresh_untracked(conn, item, concurrently, opts)
            _restore_timeouts(conn, saved)
    except _LockWaitTimeout as exc:
        log.info("refresh of %s skipped: its lock is held elsewhere (%s)", item.label, exc)
        return _recorded(conn, owned, plan, result("skipped_locked", concurrently, exc.error))
    except Exception as exc:
        return _raised(conn, owned, plan, item, result("failed", concurrently, exc))
    outcome = _OUTCOMES[status]
    done = result(outcome, concurrently)
    if status == "refreshed_pending":
        done = replace(done, pending=True)
    if outcome == "skipped_locked":
        return _recorded(conn, owned, plan, done)
    if outcome == "refreshed":
        log.info(
            "refreshed %s%s in %.3fs",
            item.label,
            " concurrently" if concurrently else "",
            done.duration,
        )
    return done


def _raised(
    conn: Connection, owned: bool, plan: _Plan, item: _Item, failed: RefreshResult
) -> RefreshResult:
    """The result of a refresh that raised ``failed.error``: a timed-out wait for another
    refresher's lock is a skip, anything else a failure; recorded in the history."""
    exc = failed.error
    assert exc is not None
    if tracking.is_lock_wait_timeout(exc):
        log.info("refresh of %s skipped: its lock is held elsewhere (%s)", item.label, exc)
        return _recorded(conn, owned, plan, replace(failed, status="skipped_locked"))
    log.error("refresh of %s failed: %s", item.label, exc, exc_info=exc)
    return _recorded(conn, owned, plan, failed)


def _refresh_incremental(
    conn: Connection,
    owned: bool,
    item: _Item,
    plan: _Plan,
    opts: RunOptions,
    only_if_stale: bool,
    result: Callable[..., RefreshResult],
) -> RefreshResult:
    """Recompute the dirty buckets of an incremental view (lock, log and history included:
    the view's own refresh function, the one pg_cron jobs run)."""
    declared = item.declared
    threshold = (
        declared.incremental.full_refresh_above
        if declared is not None and declared.incremental is not None
        else None
    )
    # The refresh function is one statement: without timeouts (set in the transaction, by a
    # statement before it) it needs no transaction around it.
    alone = plan.alone and opts.lock_timeout is None and opts.statement_timeout is None
    try:
        with _transaction(conn, owned), _alone(conn, alone):
            saved = _set_timeouts(conn, opts, owned)
            done = incremental.refresh_incremental(
                conn,
                item.qname,
                lock=opts.lock,
                only_if_dirty=only_if_stale,
                lock_namespace=opts.lock_namespace,
                threshold=threshold,
                tracking_schema_name=plan.tracking_schema,
            )
            _restore_timeouts(conn, saved)
    except Exception as exc:
        return _raised(conn, owned, plan, item, result("failed", False, exc))
    outcome = _OUTCOMES[done.status]
    res = replace(
        result(outcome),
        buckets=done.buckets,
        full_refresh=done.full_refresh,
        pending=done.status == "refreshed_pending",
    )
    if outcome == "skipped_locked":
        return _recorded(conn, owned, plan, res)
    if outcome == "refreshed":
        log.info(
            "refreshed incremental view %s (%d bucket(s)%s) in %.3fs",
            item.label,
            done.buckets,
            ", full recompute" if done.full_refresh else "",
            res.duration,
        )
    return res


def _recorded(conn: Connection, owned: bool, plan: _Plan, done: RefreshResult) -> RefreshResult:
    """Write a failure or a skip into the history (the database records refreshes itself),
    in a transaction of its own: the refresh's rolled back. Never raises."""
    err = done.error
    gone = isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated
    if not plan.tracking_on or gone:
        return done
    try:
        with _transaction(conn, owned):
            history.record_result(conn, done, schema=plan.tracking_schema)
    except sa.exc.SQLAlchemyError as exc:
        log.warning("could not record the %s of %s: %s", done.status, done.view, exc)
    return done


# -- runs --------------------------------------------------------------------------------


def _execute(
    conn: Connection,
    owned: bool,
    plan: _Plan,
    opts: RunOptions,
    *,
    stale_only: bool,
    should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    results: list[RefreshResult] = []
    status: dict[QName, RefreshStatus] = {}
    members = {item.qname for item in plan.items}
    for item in plan.items:
        if should_stop is not None and should_stop():
            break
        upstream = plan.graph.upstream(item.qname) & members
        if any(status.get(u) in ("failed", "skipped_dependency_failed") for u in upstream):
            res = RefreshResult(
                view=item.label,
                status="skipped_dependency_failed",
                concurrently=False,
            )
            log.warning("refresh of %s skipped: a view it reads failed", item.label)
        elif stale_only and not (
            item.qname in plan.stale or any(status.get(u) == "refreshed" for u in upstream)
        ):
            res = RefreshResult(view=item.label, status="skipped_fresh")
        else:
            res = _refresh_one(conn, owned, item, plan, opts, only_if_stale=stale_only)
        status[item.qname] = res.status
        results.append(res)
    return results


def _run(
    bind: Bind | OwnedConnection,
    refs: Sequence[ViewRef],
    metadata: sa.MetaData | None,
    opts: RunOptions,
    *,
    strict: bool,
    stale_only: bool,
    should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    with _connection(bind) as (conn, owned):
        what = "refresh_stale" if stale_only else "refresh_views / refresh_all"
        try:
            # Owned: the plan's reads are statements of their own (see _alone), else in the
            # transaction the first refreshed view commits.
            alone = _statements_commit_alone(conn, owned)
            with _alone(conn, alone):
                plan = _plan(
                    conn, refs, metadata, opts, strict=strict, want_stale=stale_only, what=what
                )
            plan.alone = alone
            return _execute(conn, owned, plan, opts, stale_only=stale_only, should_stop=should_stop)
        finally:
            if owned and conn.in_transaction():
                conn.rollback()  # only reads are left: every view commits its own work


def run_views(
    bind: Bind | OwnedConnection, views: Sequence[ViewRef], opts: RunOptions
) -> list[RefreshResult]:
    """:func:`refresh_views` with validated options (shared with the async twins)."""
    return _run(bind, views, None, opts, strict=True, stale_only=False)


def run_metadata(
    bind: Bind | OwnedConnection,
    metadata: sa.MetaData,
    opts: RunOptions,
    *,
    stale_only: bool,
    should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    """:func:`refresh_all` (or, with ``stale_only``, :func:`refresh_stale`) with validated
    options (shared with the async twins)."""
    return _run(
        bind,
        materialized_views(metadata, managed=True),
        metadata,
        opts,
        strict=False,
        stale_only=stale_only,
        should_stop=should_stop,
    )


def refresh_views(
    bind: Bind,
    *views: ViewRef,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
) -> list[RefreshResult]:
    """Refresh ``views`` in dependency order; one :class:`RefreshResult` per view.

    :param bind: an ``Engine`` (each view is refreshed in its own transaction and
        committed), or a ``Connection`` / ``Session`` (each view in a savepoint of the
        caller's transaction, which the caller commits; locks are held until then).
    :param views: ``MaterializedView`` objects, their ``Table``, mapped ORM classes, names
        (``"mv"`` in the current schema, or ``"schema.mv"``) or ``(schema, name)`` tuples.
    :param cascade: also refresh every materialized view that depends on them,
        transitively and through plain views (from ``pg_depend``), after them.
    :param concurrently: ``"auto"``: ``CONCURRENTLY`` when the view is populated and has a
        qualifying unique index; ``True``: demand it (a declaration without a unique key
        raises :class:`~sqlalchemy_matview.errors.ConcurrentRefreshError`; an unpopulated
        view is reported as failed); ``False``: never.
    :param lock: ``"skip"``: report ``skipped_locked`` when another process holds the
        view's advisory lock; ``"wait"``: wait for it (bounded by ``lock_timeout``);
        ``"none"``: take no advisory lock.
    :param lock_timeout: bound on lock waits for this refresh only (seconds, a
        ``timedelta`` or a PostgreSQL duration string).
    :param statement_timeout: bound on the ``REFRESH`` itself, same forms.
    :param lock_namespace: salt of the advisory-lock keys (see
        :func:`~sqlalchemy_matview.lock_key`); every process refreshing the views must pass
        the same one.

    Example::

        results = refresh_views(engine, mv_daily, cascade=True, lock_timeout=5)
        failed = [r for r in results if r.status == "failed"]
    """
    opts = run_options(cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace)
    return run_views(bind, views, opts)


def refresh_all(
    bind: Bind,
    metadata: sa.MetaData,
    *,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
) -> list[RefreshResult]:
    """Refresh every managed view declared on ``metadata``, in dependency order.

    Options as for :func:`refresh_views`. A declared view missing from the database is
    reported as ``failed`` (with :class:`~sqlalchemy_matview.errors.UnknownViewError`).

    Example::

        for result in refresh_all(engine, metadata):
            print(result.view, result.status, f"{result.duration:.2f}s")
    """
    opts = run_options(cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace)
    return run_metadata(bind, metadata, opts, stale_only=False)


def refresh_stale(
    bind: Bind,
    metadata: sa.MetaData,
    *,
    cascade: bool = False,
    concurrently: bool | Literal["auto"] = "auto",
    lock: LockMode = "skip",
    lock_timeout: Timeout = None,
    statement_timeout: Timeout = None,
    lock_namespace: str | None = None,
    _should_stop: Callable[[], bool] | None = None,
) -> list[RefreshResult]:
    """Refresh only the views of ``metadata`` whose sources changed since their last refresh.

    A view is stale when a write to one of its tracked sources (``track_changes=True``)
    committed, or a view it reads was refreshed, and no refresh has covered that yet.
    Fresh views come back as ``skipped_fresh`` without any refresh; views made stale by
    the refresh of another one in the same run are refreshed after it. Staleness is
    checked again under each view's lock, so two processes never refresh the same
    change twice. Options as for :func:`refresh_views`.

    Example::

        results = refresh_stale(engine, metadata)
        refreshed = [r.view for r in results if r.status == "refreshed"]
    """
    opts = run_options(cascade, concurrently, lock, lock_timeout, statement_timeout, lock_namespace)
    return run_metadata(bind, metadata, opts, stale_only=True, should_stop=_should_stop)
