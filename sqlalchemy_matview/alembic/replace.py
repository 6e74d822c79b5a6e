"""What ``op.replace_materialized_view`` runs, for each ``strategy``.

``"drop_create"`` drops the view's dependents and the view, creates it from the new definition
and the dependents again, all in the migration's transaction.

``"side_by_side"`` builds the new version next to the old one and swaps them
(:mod:`sqlalchemy_matview.swap`), in a transaction of its own so that the swap's locks are
released as soon as it commits:

* in a migration whose transaction Alembic owns (``context.begin_transaction()`` in
  ``env.py``, with or without ``transaction_per_migration``), inside Alembic's
  ``autocommit_block()``: what ran before is committed, the build and swap run between their
  own ``BEGIN`` and ``COMMIT``, and Alembic begins a new transaction for what follows
  (``--sql`` prints the same ``COMMIT`` / ``BEGIN`` lines);
* on a connection in autocommit mode (inside a migration's own ``autocommit_block()``), between
  its own ``BEGIN`` and ``COMMIT``;
* on a connection in a transaction that the caller owns (``engine.begin()`` handed to
  ``MigrationContext.configure``), in a savepoint: the caller's commit releases the locks,
  which a warning says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic.operations import Operations
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.ddl import ExecutableDDLElement

from .. import catalog, swap
from ..compare import Grant, capture_views
from ..compare.plan import dependents_in_order
from ..ddl import (
    CatalogStatement,
    CommentOnMaterializedView,
    CommentOnPlainView,
    CreateMaterializedView,
    CreatePlainView,
    DropMaterializedView,
    DropPlainView,
)
from ..errors import MaterializedViewError
from .ops import DependentView, ReplaceMaterializedViewOp
from .toimpl import DependentViewError, OfflineModeError, restore_access

__all__ = ["drop_create", "side_by_side"]

#: Under ``alembic``, so that the default ``alembic.ini`` shows the side-by-side progress.
log = logging.getLogger("alembic.runtime.sqlalchemy_matview")


def _label(op: ReplaceMaterializedViewOp) -> str:
    name = f"{op.schema}.{op.name}" if op.schema else op.name
    return f"replace_materialized_view({name!r}, strategy={op.strategy!r})"


def _qualified(name: str, schema: str | None) -> str:
    return f"{schema}.{name}" if schema else name


# -- what the view and its dependents look like -------------------------------------------------


def _from_operation(op: ReplaceMaterializedViewOp) -> tuple[DependentView, list[DependentView]]:
    """Offline: the view and its dependents as the operation carries them."""
    if op.dependents is None:
        raise OfflineModeError(
            f"replace_materialized_view({op.name!r}) reads the catalog to keep the view's "
            "indexes, comment, privileges and the views reading it, and cannot run with --sql "
            "(offline mode) unless the operation carries them (dependents=[...], as "
            "autogenerate writes it): regenerate the migration, or run it online"
        )
    own = DependentView(
        op.name,
        "",
        schema=op.schema,
        materialized=True,
        comment=op.comment,
        indexes=op.indexes or (),
        grants=op.grants or (),
        owner=op.owner,
    )
    return own, list(op.dependents)


_SET_PATH = sa.text("SELECT pg_catalog.set_config('search_path', :path, false)")


def _from_catalog(
    conn: Connection, op: ReplaceMaterializedViewOp, *, views_first: bool = False
) -> tuple[DependentView, list[DependentView]]:
    """Online: the view and every view reading it, each after what it reads.

    ``views_first`` prints the dependents' definitions with the schemas of the views read
    first on ``search_path``, so that they name those views without a schema and, built with
    the staging schemas in front, read the staged versions.
    """
    target = (op.schema or catalog.current_schema(conn), op.name)
    order = dependents_in_order(catalog.dependencies(conn), target)
    saved: str | None = None
    if views_first:
        preparer = conn.dialect.identifier_preparer
        saved = str(conn.scalar(sa.text("SELECT pg_catalog.current_setting('search_path')")))
        schemas = dict.fromkeys([target[0], *(key[0] for key in order)])
        first = ", ".join(preparer.quote_identifier(s) for s in schemas)
        conn.execute(_SET_PATH, {"path": f"{first}, {saved}"})
    try:
        captured = capture_views(conn, [target, *order])
    finally:
        if saved is not None:
            conn.execute(_SET_PATH, {"path": saved})
    found = captured.get(target)
    if found is None or found.kind != "m":
        raise MaterializedViewError(
            f"replace_materialized_view({'.'.join(target)!r}): there is no such materialized "
            "view; use op.create_materialized_view to create it"
        )
    own = DependentView.from_captured(found, found.schema)
    return own, [DependentView.from_captured(captured[k], k[0]) for k in order if k in captured]


def _captured_state(
    operations: Operations, op: ReplaceMaterializedViewOp, *, views_first: bool = False
) -> tuple[DependentView, list[DependentView]]:
    if operations.migration_context.as_sql:
        return _from_operation(op)
    return _from_catalog(operations.get_bind(), op, views_first=views_first)


# -- change tracking kept in step with the new definition ---------------------------------------

_PROBE = "sqlalchemy_matview_swap_sources"

_SOURCES = sa.text(
    """
    SELECT DISTINCT n.nspname AS schema, c.relname AS name
      FROM pg_catalog.pg_rewrite r
      JOIN pg_catalog.pg_depend d ON d.objid = r.oid
           AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass::pg_catalog.oid
           AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
           AND d.deptype = 'n'
      JOIN pg_catalog.pg_class c ON c.oid = d.refobjid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE r.ev_class = pg_catalog.to_regclass(:relation)::pg_catalog.oid
       AND d.refobjid <> r.ev_class
     ORDER BY 1, 2
    """
)


class _TemporaryView(ExecutableDDLElement):
    inherit_cache = False

    def __init__(self, definition: Any, columns: tuple[str, ...] | None) -> None:
        self.create = CreatePlainView(_PROBE, "pg_temp", definition)
        self.columns = columns


@compiles(_TemporaryView, "postgresql")
def _visit_temporary(element: _TemporaryView, compiler: Any, **kw: Any) -> str:
    text = str(compiler.process(element.create))
    if element.columns:
        names = ", ".join(compiler.preparer.quote(c) for c in element.columns)
        head = "CREATE VIEW " + compiler.preparer.format_table(element.create.table)
        text = f"{head} ({names}){text[len(head) :]}"
    return text


@dataclass(frozen=True)
class TrackingSync:
    """A tracked view whose new definition reads other tables than the old one.

    Change tracking is kept by the view's name, so it survives a replace; only the tables it
    watches must follow the definition. :meth:`widen` (before the new version reads its
    sources) watches the old and the new tables, so that a write to a new table committed
    while the new version is built marks it stale; :meth:`narrow` (once the old version is
    gone) stops watching the tables only the old one read.

    Everything about change tracking that a replace does is here, through the public
    functions of :mod:`sqlalchemy_matview.orchestration.tracking`.
    """

    schema: str
    name: str
    old: tuple[tuple[str, str], ...]
    new: tuple[tuple[str, str], ...]
    tracking_schema: str | None = None

    @classmethod
    def read(
        cls, conn: Connection, op: ReplaceMaterializedViewOp, schema: str
    ) -> TrackingSync | None:
        """``None`` unless the view is tracked and its sources change (a few queries)."""
        try:
            from ..orchestration import tracking
        except ImportError:  # pragma: no cover - depends on the installed version
            return None
        if (schema, op.name) not in tracking.tracking_installed(conn, op.tracking_schema):
            return None
        preparer = conn.dialect.identifier_preparer
        relation = preparer.format_table(sa.table(op.name, schema=schema))
        old = tuple((str(r[0]), str(r[1])) for r in conn.execute(_SOURCES, {"relation": relation}))
        conn.execute(_TemporaryView(op.definition, op.columns))
        try:
            probe = preparer.format_table(sa.table(_PROBE, schema="pg_temp"))
            new = tuple((str(r[0]), str(r[1])) for r in conn.execute(_SOURCES, {"relation": probe}))
        finally:
            conn.execute(DropPlainView(_PROBE, "pg_temp"))
        if set(old) == set(new):
            return None
        return cls(schema, op.name, old, new, op.tracking_schema)

    def _install(self, conn: Connection, sources: tuple[tuple[str, str], ...]) -> None:
        from ..orchestration import tracking

        tracking.install_tracking(
            conn, self.schema, self.name, list(sources), schema=self.tracking_schema
        )

    def widen(self, conn: Connection) -> None:
        if not set(self.new) <= set(self.old):
            self._install(conn, tuple(dict.fromkeys(self.old + self.new)))

    def narrow(self, conn: Connection) -> None:
        if not set(self.old) <= set(self.new):
            self._install(conn, self.new)

    def undo(self, conn: Connection) -> None:
        """Back to the old tables, after :meth:`widen`, when the replace failed."""
        if not set(self.new) <= set(self.old):
            self._install(conn, self.old)


# -- drop and create ---------------------------------------------------------------------------


def _restore_extras(operations: Operations, item: DependentView) -> None:
    for index in item.indexes:
        operations.execute(CatalogStatement(index))
    if item.comment is not None:
        if item.materialized:
            operations.execute(
                CommentOnMaterializedView(item.name, item.comment, schema=item.schema)
            )
        else:
            operations.execute(CommentOnPlainView(item.name, item.schema, item.comment))
    # Captured by the role running the migration: owner is None when that role owns it.
    restore_access(
        operations,
        item.name,
        item.schema,
        materialized=item.materialized,
        grants=[Grant(*g) for g in item.grants],
        owner=item.owner,
        current_user=None,
    )


def _dependent_error(
    op: ReplaceMaterializedViewOp, item: DependentView | swap.SwappedView, exc: DBAPIError
) -> DependentViewError:
    return DependentViewError(
        f"replace_materialized_view({op.name!r}): the dependent view "
        f"{_qualified(item.name, item.schema)} cannot be re-created on the new definition "
        f"({exc.orig}); drop or replace it in the migration before this operation"
    )


def drop_create(operations: Operations, op: ReplaceMaterializedViewOp) -> None:
    """Drop the dependents and the view, create them again: in the migration's transaction."""
    own, dependents = _captured_state(operations, op)
    sync = None
    if not operations.migration_context.as_sql:
        conn = operations.get_bind()
        sync = TrackingSync.read(conn, op, own.schema or catalog.current_schema(conn))
        if sync is not None:
            sync.widen(conn)
    for item in reversed(dependents):
        if item.materialized:
            operations.execute(DropMaterializedView(item.name, schema=item.schema))
        else:
            operations.execute(DropPlainView(item.name, item.schema))
    operations.execute(DropMaterializedView(op.name, schema=op.schema))
    operations.execute(
        CreateMaterializedView(
            op.name, op.definition, schema=op.schema, with_data=op.with_data, columns=op.columns
        )
    )
    _restore_extras(operations, own)

    for item in dependents:
        statement: ExecutableDDLElement
        if item.materialized:
            statement = CreateMaterializedView(
                item.name, item.definition, schema=item.schema, with_data=item.with_data
            )
        else:
            statement = CreatePlainView(item.name, item.schema, item.definition, item.options)
        try:
            operations.execute(statement)
        except DBAPIError as exc:
            raise _dependent_error(op, item, exc) from exc
        _restore_extras(operations, item)
    if sync is not None:
        sync.narrow(operations.get_bind())


# -- side by side ------------------------------------------------------------------------------


def _swapped(item: DependentView) -> swap.SwappedView:
    return swap.SwappedView(
        name=item.name,
        schema=item.schema,
        materialized=item.materialized,
        definition=item.definition,
        with_data=item.with_data,
        comment=item.comment,
        options=tuple(item.options),
        indexes=tuple(item.indexes),
        grants=tuple(Grant(*g) for g in item.grants),
        owner=item.owner,
    )


def _lock_keys(items: tuple[swap.SwappedView, ...], default_schema: str) -> list[int]:
    from ..orchestration.locking import lock_key

    return [lock_key((i.schema or default_schema, i.name)) for i in items if i.materialized]


def _plan(
    op: ReplaceMaterializedViewOp,
    own: DependentView,
    dependents: list[DependentView],
    default_schema: str,
    schema_taken: Callable[[str], bool] = lambda name: False,
) -> swap.SwapPlan:
    # The view is populated (an unpopulated one is dropped and created): so is its new version.
    view = dataclasses.replace(
        _swapped(own), definition=op.definition, columns=op.columns, with_data=True
    )
    rest = [_swapped(d) for d in dependents]
    return swap.plan_swap(
        view,
        rest,
        lock_timeout=op.swap_lock_timeout,
        retries=op.swap_retries,
        lock_keys=_lock_keys((view, *rest), default_schema),
        schema_taken=schema_taken,
    )


_POPULATED = sa.text(
    "SELECT c.relispopulated FROM pg_catalog.pg_class c"
    " WHERE c.oid = pg_catalog.to_regclass(:relation)::pg_catalog.oid AND c.relkind = 'm'"
)
_SCHEMA_TAKEN = sa.text("SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = :name)")


@Operations.implementation_for(ReplaceMaterializedViewOp)
def replace_materialized_view(operations: Operations, op: ReplaceMaterializedViewOp) -> None:
    if op.strategy == "side_by_side":
        side_by_side(operations, op)
    else:
        drop_create(operations, op)


def side_by_side(operations: Operations, op: ReplaceMaterializedViewOp) -> None:
    """Build the new version next to the old one, then swap them (see the module docstring)."""
    context = operations.migration_context
    if not op.with_data:
        log.info("%s: with_data=False leaves no reader to protect: drop and create", _label(op))
        drop_create(operations, op)
        return
    if context.as_sql:
        own, dependents = _from_operation(op)
        plan = _plan(op, own, dependents, _default_schema())
        with context.autocommit_block():
            operations.execute(sa.text("BEGIN"))
            for statement in [*plan.locks(), *plan.build(), plan.swap()]:
                operations.execute(statement)
            operations.execute(sa.text("COMMIT"))
        return

    conn = operations.get_bind()
    relation = conn.dialect.identifier_preparer.format_table(sa.table(op.name, schema=op.schema))
    populated = conn.scalar(_POPULATED, {"relation": relation})
    if populated is False:
        # Reading an unpopulated view fails whatever happens: nothing to protect.
        log.info(
            "%s: the view is not populated, so nobody can read it: drop and create", _label(op)
        )
        drop_create(operations, op)
        return
    if getattr(conn.connection.dbapi_connection, "autocommit", False):
        _run(operations, op, own_transaction=True)
    elif getattr(context, "_transaction", None) is not None or not conn.in_transaction():
        with context.autocommit_block():
            _run(operations, op, own_transaction=True)
    else:
        log.warning(
            "%s runs in a transaction that the migration does not own: the swap's locks are "
            "held until it commits",
            _label(op),
        )
        with conn.begin_nested():
            _run(operations, op, own_transaction=False)


def _default_schema() -> str:
    from ..orchestration.locking import DEFAULT_SCHEMA

    return DEFAULT_SCHEMA


@contextlib.contextmanager
def _transaction(conn: Connection, own: bool) -> Iterator[None]:
    """``BEGIN`` ... ``COMMIT`` on a connection in autocommit mode (``ROLLBACK`` on error);
    nothing when the caller's transaction (or savepoint) is in charge."""
    if not own:
        yield
        return
    conn.execute(sa.text("BEGIN"))
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute(sa.text("ROLLBACK"))
        raise
    conn.execute(sa.text("COMMIT"))


def _with_lock_retries(
    conn: Connection, op: ReplaceMaterializedViewOp, own: bool, work: Callable[[], None]
) -> None:
    """``work`` in a transaction of its own, waiting at most ``swap_lock_timeout`` for each
    lock and trying again like the swap does (tracking creates and drops triggers)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with _transaction(conn, own):
                if own:
                    conn.execute(
                        sa.text("SELECT pg_catalog.set_config('lock_timeout', :t, true)"),
                        {"t": f"{max(1, round(op.swap_lock_timeout * 1000))}ms"},
                    )
                work()
            return
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
            if not own or code not in ("55P03", "40P01") or attempt > op.swap_retries:
                raise
        start, cap = swap.BACKOFF_START, swap.BACKOFF_MAX
        time.sleep(min(cap, start * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))


def _size(size: int) -> str:
    """``size`` bytes in a unit that reads.

    >>> _size(24576), _size(15_400_000), _size(3 * 10**9)
    ('25 kB', '15.4 MB', '3.0 GB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{round(size / 1e3)} kB"


_CAN_CREATE_SCHEMAS = sa.text(
    "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')"
)


@contextlib.contextmanager
def _undone_on_failure(
    conn: Connection, op: ReplaceMaterializedViewOp, own: bool, sync: TrackingSync | None
) -> Iterator[None]:
    """Change tracking as it was when the build or the swap fails (in its own transaction;
    in the caller's, the savepoint undoes it)."""
    try:
        yield
    except BaseException:
        if sync is not None and own:
            try:
                _with_lock_retries(conn, op, own, lambda: sync.undo(conn))
            except Exception:
                log.exception("%s: could not set change tracking back", _label(op))
        raise


def _run(operations: Operations, op: ReplaceMaterializedViewOp, *, own_transaction: bool) -> None:
    conn = operations.get_bind()
    label = _label(op)
    if not conn.scalar(_CAN_CREATE_SCHEMAS):
        raise swap.SwapError(
            f"{label} builds the new version in a schema of its own, and the role running the "
            "migration may not create schemas in this database: GRANT CREATE ON DATABASE to "
            "it, or use strategy='drop_create'; nothing was changed"
        )
    default_schema = catalog.current_schema(conn)
    own, dependents = _from_catalog(conn, op, views_first=True)
    plan = _plan(
        op,
        own,
        dependents,
        default_schema,
        lambda name: bool(conn.scalar(_SCHEMA_TAKEN, {"name": name})),
    )
    log.info(
        "%s: building the new version and %d dependent view(s) next to the old ones (about "
        "%s more disk until the swap)",
        label,
        len(plan.dependents),
        _size(swap.extra_disk_bytes(conn, plan)),
    )
    sync = TrackingSync.read(conn, op, own.schema or default_schema)
    if sync is not None:
        _with_lock_retries(conn, op, own_transaction, lambda: sync.widen(conn))

    step = "building"
    try:
        with (
            _undone_on_failure(conn, op, own_transaction, sync),
            _transaction(conn, own_transaction),
        ):
            for statement in plan.locks():
                conn.execute(statement)
            started = time.perf_counter()
            for item, statement in plan.build_steps():
                try:
                    conn.execute(statement)
                except DBAPIError as exc:
                    if item is not None and item is not plan.view:
                        raise _dependent_error(op, item, exc) from exc
                    raise
            built = time.perf_counter() - started
            changed = swap.changed_result_types(conn, plan)
            if changed:
                log.warning(
                    "%s: the columns of %s change: readers' prepared statements returning them "
                    "fail after the swap with 'cached plan must not change result type' (see "
                    '"Readers\' prepared statements" in docs/alembic.md)',
                    label,
                    ", ".join(changed),
                )
            step = "swapping"
            started = time.perf_counter()
            conn.execute(plan.swap())
            attempts = conn.scalar(
                sa.text("SELECT pg_catalog.current_setting(:name, true)"),
                {"name": swap.ATTEMPTS_SETTING},
            )
        swapped = time.perf_counter() - started
    except DBAPIError as exc:
        if swap.is_lock_timeout(exc):
            raise swap.SwapLockTimeoutError(f"{label}: {exc.orig}; nothing was changed") from exc
        raise swap.SwapError(
            f"{label} failed while {step} ({exc.orig}); nothing was changed"
        ) from exc
    log.info(
        "%s: built in %.1fs, swapped in %.0f ms (%s attempt(s))",
        label,
        built,
        swapped * 1000,
        attempts,
    )
    if sync is not None:
        _with_lock_retries(conn, op, own_transaction, lambda: sync.narrow(conn))
