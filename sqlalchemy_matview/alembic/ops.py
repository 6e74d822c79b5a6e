"""Alembic operations for materialized views: ``op.create_materialized_view`` and friends.

Each operation is a small class holding its arguments, with a classmethod that becomes the
``op.<name>(...)`` directive, a :meth:`reverse` used to write downgrades and a
``to_diff_tuple`` used by ``alembic check``. The SQL they run lives in
:mod:`sqlalchemy_matview.alembic.toimpl`; how autogenerate writes them lives in
:mod:`sqlalchemy_matview.alembic.render`.

Importing this module makes the directives available on ``op`` (the usual Alembic pattern for
operation plugins); that is why generated migrations import it. Comparators are only installed
by :func:`sqlalchemy_matview.alembic.register` or by the ``alembic.plugins`` entry point.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from alembic.operations import MigrateOperation, Operations
from sqlalchemy.sql.elements import ClauseElement

from ..compare import PRIVILEGES, CapturedView, Grant, definition_sql
from ..errors import MaterializedViewError
from ..schema import REPLACE_STRATEGIES
from ..swap import DEFAULT_SWAP_LOCK_TIMEOUT, DEFAULT_SWAP_RETRIES, check_swap_options

if TYPE_CHECKING:
    from ..schema import Definition

__all__ = [
    "CreateIncrementalViewOp",
    "CreateMaterializedViewOp",
    "CreatePlainViewOp",
    "DependentView",
    "DisableChangeTrackingOp",
    "DropIncrementalViewOp",
    "DropMaterializedViewOp",
    "DropPlainViewOp",
    "EnableChangeTrackingOp",
    "InstallChangeTrackingOp",
    "InvalidGrantError",
    "InvalidReplaceStrategyError",
    "IrreversibleOperationError",
    "RefreshMaterializedViewOp",
    "ReplaceMaterializedViewOp",
    "SetMaterializedViewCommentOp",
    "UninstallChangeTrackingOp",
]

Sources = Sequence[tuple[str | None, str]]
#: ``(grantee, privilege)`` or ``(grantee, privilege, with_grant_option)``; ``"public"``
#: stands for ``PUBLIC``.
GrantSpec = tuple[str, str] | tuple[str, str, bool] | Grant


class IrreversibleOperationError(MaterializedViewError, ValueError):
    """An operation was asked for its reverse without the state needed to write it."""


class InvalidGrantError(MaterializedViewError, ValueError):
    """A ``grants=`` entry of a view operation is not ``(role, privilege[, grantable])``."""


class InvalidReplaceStrategyError(MaterializedViewError, ValueError):
    """``strategy=`` of ``replace_materialized_view`` is not one of the strategies."""


def _strategy(view: str, strategy: object) -> str:
    if strategy not in REPLACE_STRATEGIES:
        raise InvalidReplaceStrategyError(
            f"replace_materialized_view({view!r}): strategy={strategy!r} is not a strategy; "
            f"pass {' or '.join(repr(s) for s in REPLACE_STRATEGIES)}"
        )
    return str(strategy)


def _grants(view: str, grants: Sequence[GrantSpec] | None) -> tuple[Grant, ...] | None:
    """Checked :class:`~sqlalchemy_matview.compare.Grant` records, before any SQL is sent."""
    if grants is None:
        return None
    checked: list[Grant] = []
    for entry in grants:
        if (
            not isinstance(entry, tuple)
            or len(entry) not in (2, 3)
            or not isinstance(entry[0], str)
            or not entry[0]
            or not isinstance(entry[1], str)
        ):
            raise InvalidGrantError(
                f"grants of view {view!r}: {entry!r} is not (role, privilege) or "
                "(role, privilege, with_grant_option), e.g. ('app_reader', 'SELECT')"
            )
        privilege = entry[1].upper()
        if privilege not in PRIVILEGES:
            raise InvalidGrantError(
                f"grants of view {view!r}: {entry[1]!r} is not a privilege on a view; use "
                f"one of {', '.join(sorted(PRIVILEGES))}"
            )
        grantable = bool(entry[2]) if len(entry) == 3 else False
        checked.append(Grant(entry[0], privilege, grantable))
    return tuple(checked)


def _sql(definition: Definition) -> str:
    return definition_sql(definition) if isinstance(definition, ClauseElement) else definition


def _sources(sources: Sources | None) -> tuple[tuple[str | None, str], ...] | None:
    return None if sources is None else tuple((s, t) for s, t in sources)


@Operations.register_operation("create_materialized_view")
class CreateMaterializedViewOp(MigrateOperation):
    """``CREATE MATERIALIZED VIEW``: see :meth:`create_materialized_view`."""

    def __init__(
        self,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        with_data: bool = True,
        comment: str | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.definition = definition
        self.schema = schema
        self.with_data = with_data
        self.comment = comment
        self.columns = tuple(columns) if columns is not None else None
        self.indexes = tuple(indexes) if indexes is not None else None
        self.grants = _grants(name, grants)
        self.owner = owner

    @classmethod
    def create_materialized_view(
        cls,
        operations: Operations,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        with_data: bool = True,
        comment: str | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        """Create a materialized view.

        ``definition`` is SQL text (as autogenerate writes it), a ``text()`` or a ``select()``.
        ``columns`` names the view's columns when they should differ from the query's own;
        ``comment`` is set with ``COMMENT ON MATERIALIZED VIEW``. ``indexes`` are complete
        ``CREATE INDEX`` statements run after the view is created: autogenerate uses them
        to re-create, exactly as the catalog printed them, the indexes of a view it dropped
        and creates again around table changes.

        ``grants`` are privileges given once the view exists, each ``(role, privilege)`` or
        ``(role, privilege, with_grant_option)``, ``"public"`` standing for ``PUBLIC``;
        ``owner`` is the role that should own it (``ALTER ... OWNER TO``, run only when it is
        not the role running the migration). Autogenerate writes both for a view it drops
        and creates again, so that the roles reading it keep their access.

        Example::

            op.create_materialized_view(
                "mv_daily",
                "SELECT date_trunc('day', created_at) AS day, count(*) AS n "
                "FROM events GROUP BY 1",
                with_data=False,
            )
            op.create_materialized_view(
                "mv_kinds",
                "SELECT DISTINCT kind FROM events",
                grants=[("app_reader", "SELECT"), ("Report Reader", "SELECT", True)],
                owner="reporting",
            )
        """
        operations.invoke(
            cls(
                name,
                definition,
                schema=schema,
                with_data=with_data,
                comment=comment,
                columns=columns,
                indexes=indexes,
                grants=grants,
                owner=owner,
            )
        )

    def reverse(self) -> DropMaterializedViewOp:
        return DropMaterializedViewOp(
            self.name,
            schema=self.schema,
            definition=self.definition,
            with_data=self.with_data,
            comment=self.comment,
            columns=self.columns,
            indexes=self.indexes,
            grants=self.grants,
            owner=self.owner,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("create_materialized_view", self.schema, self.name, _sql(self.definition))


@Operations.register_operation("drop_materialized_view")
class DropMaterializedViewOp(MigrateOperation):
    """``DROP MATERIALIZED VIEW``: see :meth:`drop_materialized_view`."""

    def __init__(
        self,
        name: str,
        *,
        schema: str | None = None,
        if_exists: bool = False,
        cascade: bool = False,
        definition: Definition | None = None,
        with_data: bool = True,
        comment: str | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.schema = schema
        self.if_exists = if_exists
        self.cascade = cascade
        self.definition = definition
        self.with_data = with_data
        self.comment = comment
        self.columns = tuple(columns) if columns is not None else None
        self.indexes = tuple(indexes) if indexes is not None else None
        self.grants = _grants(name, grants)
        self.owner = owner

    @classmethod
    def drop_materialized_view(
        cls,
        operations: Operations,
        name: str,
        *,
        schema: str | None = None,
        if_exists: bool = False,
        cascade: bool = False,
        definition: Definition | None = None,
        with_data: bool = True,
        comment: str | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        """Drop a materialized view.

        ``definition`` (with ``with_data``, ``comment``, ``columns``, ``indexes``, the
        ``CREATE INDEX`` statements of its indexes, and ``grants`` and ``owner``, see
        :meth:`create_materialized_view`) is not used to drop; it is what makes the operation
        reversible, and autogenerate always fills it in.

        Example::

            op.drop_materialized_view("mv_daily", definition="SELECT 1 AS one")
        """
        operations.invoke(
            cls(
                name,
                schema=schema,
                if_exists=if_exists,
                cascade=cascade,
                definition=definition,
                with_data=with_data,
                comment=comment,
                columns=columns,
                indexes=indexes,
                grants=grants,
                owner=owner,
            )
        )

    def reverse(self) -> CreateMaterializedViewOp:
        if self.definition is None:
            raise IrreversibleOperationError(
                f"drop_materialized_view({self.name!r}) cannot be reversed: it does not know "
                "the view's definition; pass definition='SELECT ...'"
            )
        return CreateMaterializedViewOp(
            self.name,
            self.definition,
            schema=self.schema,
            with_data=self.with_data,
            comment=self.comment,
            columns=self.columns,
            indexes=self.indexes,
            grants=self.grants,
            owner=self.owner,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_materialized_view", self.schema, self.name)


class DependentView(NamedTuple):
    """A view (or materialized view) reading a replaced view, as it was when the migration
    was generated: what :meth:`~ReplaceMaterializedViewOp.replace_materialized_view` drops
    and creates again when it cannot read the catalog (``--sql``).

    Example::

        DependentView(
            "big_totals",
            "SELECT kind, n FROM mv_totals WHERE n > 10",
            grants=[("app_reader", "SELECT")],
        )
        DependentView(
            "mv_top",
            "SELECT kind FROM mv_totals ORDER BY n DESC LIMIT 10",
            materialized=True,
            indexes=["CREATE UNIQUE INDEX mv_top_kind ON mv_top USING btree (kind)"],
        )
    """

    name: str
    #: Its query, as ``pg_get_viewdef`` prints it.
    definition: str
    schema: str | None = None
    materialized: bool = False
    #: Populated (materialized views only).
    with_data: bool = True
    comment: str | None = None
    #: ``key=value`` options of a plain view (``security_barrier=true``).
    options: Sequence[str] = ()
    #: ``CREATE INDEX`` statements (materialized views only).
    indexes: Sequence[str] = ()
    grants: Sequence[GrantSpec] = ()
    owner: str | None = None

    @classmethod
    def from_captured(cls, view: CapturedView, schema: str | None) -> DependentView:
        """The record of a view read from the catalog, named in ``schema``."""
        return cls(
            view.name,
            view.definition,
            schema=schema,
            materialized=view.kind == "m",
            with_data=view.populated,
            comment=view.comment,
            options=view.options,
            indexes=view.indexes,
            grants=view.grants,
            owner=view.owner,
        )


def _dependents(views: Sequence[DependentView] | None) -> tuple[DependentView, ...] | None:
    if views is None:
        return None
    checked = []
    for view in views:
        if not isinstance(view, DependentView):
            raise TypeError(f"dependents= takes DependentView records, got {view!r}")
        checked.append(
            view._replace(
                options=tuple(view.options),
                indexes=tuple(view.indexes),
                grants=_grants(view.name, view.grants) or (),
            )
        )
    return tuple(checked)


@Operations.register_operation("replace_materialized_view")
class ReplaceMaterializedViewOp(MigrateOperation):
    """Drop and re-create a view with a new definition, keeping its dependents."""

    def __init__(
        self,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        with_data: bool = True,
        old_definition: Definition | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        comment: str | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
        dependents: Sequence[DependentView] | None = None,
        strategy: str = "drop_create",
        swap_lock_timeout: float | timedelta = DEFAULT_SWAP_LOCK_TIMEOUT,
        swap_retries: int = DEFAULT_SWAP_RETRIES,
        tracking_schema: str | None = None,
    ) -> None:
        self.name = name
        self.definition = definition
        self.schema = schema
        self.with_data = with_data
        self.old_definition = old_definition
        self.columns = tuple(columns) if columns is not None else None
        self.indexes = tuple(indexes) if indexes is not None else None
        self.comment = comment
        self.grants = _grants(name, grants)
        self.owner = owner
        self.dependents = _dependents(dependents)
        self.strategy = _strategy(name, strategy)
        self.swap_lock_timeout, self.swap_retries = check_swap_options(
            name, swap_lock_timeout, swap_retries
        )
        self.tracking_schema = tracking_schema

    @classmethod
    def replace_materialized_view(
        cls,
        operations: Operations,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        with_data: bool = True,
        old_definition: Definition | None = None,
        columns: Sequence[str] | None = None,
        indexes: Sequence[str] | None = None,
        comment: str | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
        dependents: Sequence[DependentView] | None = None,
        strategy: str = "drop_create",
        swap_lock_timeout: float | timedelta = DEFAULT_SWAP_LOCK_TIMEOUT,
        swap_retries: int = DEFAULT_SWAP_RETRIES,
        tracking_schema: str | None = None,
    ) -> None:
        """Give a materialized view a new definition.

        PostgreSQL has no ``CREATE OR REPLACE MATERIALIZED VIEW``, so the view is dropped and
        created again. Every view and materialized view that reads it (directly or through
        others, as recorded in ``pg_depend``) is dropped first and re-created afterwards from
        its current definition, with its indexes, comment, populated state, privileges
        (``GRANT``) and owner; the view's own indexes, comment, privileges and owner are
        restored too. All of it runs in the migration's transaction.
        ``old_definition`` makes the operation reversible.

        ``indexes``, ``comment``, ``grants``, ``owner`` and ``dependents`` describe the view
        and the views reading it as they were when the migration was generated (autogenerate
        writes them; :class:`DependentView` records, in creation order). They are what
        ``--sql`` prints, since offline mode cannot read the catalog; run online, the
        operation reads the catalog instead, and keeps whatever the database has then.
        Without ``dependents`` the operation cannot run offline and says so
        (:class:`~sqlalchemy_matview.alembic.toimpl.OfflineModeError`) before printing any
        of its SQL.

        ``strategy="side_by_side"`` replaces the view without making its readers wait for
        the rebuild (:mod:`sqlalchemy_matview.swap`): the new version, and every view
        depending on it, is built next to the old one while readers keep reading it; then
        one short transaction swaps them, waiting at most ``swap_lock_timeout`` seconds for
        each lock and trying again up to ``swap_retries`` times (with a growing pause) before
        it fails, leaving the old views as they were. Build and swap commit on their own: in
        a migration whose transaction Alembic owns, what the migration did before is
        committed first and a new transaction begins after the swap (Alembic's
        ``autocommit_block``); run inside a transaction of the caller's, the operation uses a
        savepoint and the locks last until the caller commits. A view created ``WITH NO
        DATA`` (``with_data=False``) or not populated in the database has no reader to
        protect, and is dropped and created. The default, ``"drop_create"``, does it all in
        the migration's transaction.

        Example::

            op.replace_materialized_view(
                "mv_totals",
                "SELECT kind, count(*) AS n FROM events GROUP BY kind",
                old_definition="SELECT kind FROM events GROUP BY kind",
                indexes=["CREATE UNIQUE INDEX mv_totals_kind ON mv_totals USING btree (kind)"],
                grants=[("app_reader", "SELECT")],
                dependents=[DependentView("big_totals", "SELECT kind FROM mv_totals")],
            )
            op.replace_materialized_view(
                "mv_totals",
                "SELECT kind, count(*) AS n, max(id) AS last_id FROM events GROUP BY kind",
                strategy="side_by_side",
                swap_lock_timeout=0.2,
            )
        """
        operations.invoke(
            cls(
                name,
                definition,
                schema=schema,
                with_data=with_data,
                old_definition=old_definition,
                columns=columns,
                indexes=indexes,
                comment=comment,
                grants=grants,
                owner=owner,
                dependents=dependents,
                strategy=strategy,
                swap_lock_timeout=swap_lock_timeout,
                swap_retries=swap_retries,
                tracking_schema=tracking_schema,
            )
        )

    def reverse(self) -> ReplaceMaterializedViewOp:
        if self.old_definition is None:
            raise IrreversibleOperationError(
                f"replace_materialized_view({self.name!r}) cannot be reversed: it does not "
                "know the previous definition; pass old_definition='SELECT ...'"
            )
        # The view and its dependents look the same before the reverse as before this one.
        return ReplaceMaterializedViewOp(
            self.name,
            self.old_definition,
            schema=self.schema,
            with_data=self.with_data,
            old_definition=self.definition,
            columns=self.columns,
            indexes=self.indexes,
            comment=self.comment,
            grants=self.grants,
            owner=self.owner,
            dependents=self.dependents,
            strategy=self.strategy,
            swap_lock_timeout=self.swap_lock_timeout,
            swap_retries=self.swap_retries,
            tracking_schema=self.tracking_schema,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (
            "replace_materialized_view",
            self.schema,
            self.name,
            _sql(self.old_definition) if self.old_definition is not None else None,
            _sql(self.definition),
        )


@Operations.register_operation("refresh_materialized_view")
class RefreshMaterializedViewOp(MigrateOperation):
    """``REFRESH MATERIALIZED VIEW``: see :meth:`refresh_materialized_view`."""

    def __init__(
        self,
        name: str,
        *,
        schema: str | None = None,
        concurrently: bool = False,
        with_data: bool = True,
    ) -> None:
        self.name = name
        self.schema = schema
        self.concurrently = concurrently
        self.with_data = with_data

    @classmethod
    def refresh_materialized_view(
        cls,
        operations: Operations,
        name: str,
        *,
        schema: str | None = None,
        concurrently: bool = False,
        with_data: bool = True,
    ) -> None:
        """Refresh a materialized view, for instance after a data migration.

        Its reverse refreshes the view again, so that a downgrade that changed the data
        leaves the view current as well.

        Example::

            op.refresh_materialized_view("mv_daily", concurrently=True)
        """
        operations.invoke(cls(name, schema=schema, concurrently=concurrently, with_data=with_data))

    def reverse(self) -> RefreshMaterializedViewOp:
        return RefreshMaterializedViewOp(
            self.name,
            schema=self.schema,
            concurrently=self.concurrently,
            with_data=self.with_data,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("refresh_materialized_view", self.schema, self.name)


@Operations.register_operation("set_materialized_view_comment")
class SetMaterializedViewCommentOp(MigrateOperation):
    """``COMMENT ON MATERIALIZED VIEW``: see :meth:`set_materialized_view_comment`."""

    def __init__(
        self,
        name: str,
        comment: str | None,
        *,
        schema: str | None = None,
        existing_comment: str | None = None,
    ) -> None:
        self.name = name
        self.comment = comment
        self.schema = schema
        self.existing_comment = existing_comment

    @classmethod
    def set_materialized_view_comment(
        cls,
        operations: Operations,
        name: str,
        comment: str | None,
        *,
        schema: str | None = None,
        existing_comment: str | None = None,
    ) -> None:
        """Set the comment of a materialized view (``None`` removes it).

        ``existing_comment`` is what the reverse operation sets back.

        Example::

            op.set_materialized_view_comment("mv_daily", "Events per day, refreshed hourly")
        """
        operations.invoke(cls(name, comment, schema=schema, existing_comment=existing_comment))

    def reverse(self) -> SetMaterializedViewCommentOp:
        return SetMaterializedViewCommentOp(
            self.name, self.existing_comment, schema=self.schema, existing_comment=self.comment
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (
            "set_materialized_view_comment",
            self.schema,
            self.name,
            self.existing_comment,
            self.comment,
        )


@Operations.register_operation("install_change_tracking")
class InstallChangeTrackingOp(MigrateOperation):
    """Create the change-tracking bookkeeping: see :meth:`install_change_tracking`."""

    def __init__(self, *, schema: str | None = None) -> None:
        self.schema = schema

    @classmethod
    def install_change_tracking(cls, operations: Operations, *, schema: str | None = None) -> None:
        """Create the schema, tables and functions change tracking needs (idempotent).

        Autogenerate writes it in the first migration that tracks a view; its reverse
        removes them all. ``schema`` is the bookkeeping schema (default
        ``sqlalchemy_matview``). Also moves the bookkeeping of release 0.1.0 out of
        ``public`` (online only). Under ``--sql`` it prints the ``CREATE`` statements.

        Example::

            op.install_change_tracking()
        """
        operations.invoke(cls(schema=schema))

    def reverse(self) -> UninstallChangeTrackingOp:
        return UninstallChangeTrackingOp(schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("install_change_tracking", self.schema)


@Operations.register_operation("uninstall_change_tracking")
class UninstallChangeTrackingOp(MigrateOperation):
    """Remove every change-tracking object: see :meth:`uninstall_change_tracking`."""

    def __init__(self, *, schema: str | None = None) -> None:
        self.schema = schema

    @classmethod
    def uninstall_change_tracking(
        cls, operations: Operations, *, schema: str | None = None
    ) -> None:
        """Drop the bookkeeping schema with its tables, functions and every trigger calling
        them (and 0.1.0's objects in ``public``).

        Autogenerate writes it in the migration that stops tracking the last view (and the
        downgrade of the one that installed it), so that after ``alembic downgrade base``
        nothing of the library remains.

        Example::

            op.uninstall_change_tracking()
        """
        operations.invoke(cls(schema=schema))

    def reverse(self) -> InstallChangeTrackingOp:
        return InstallChangeTrackingOp(schema=self.schema)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("uninstall_change_tracking", self.schema)


@Operations.register_operation("enable_change_tracking")
class EnableChangeTrackingOp(MigrateOperation):
    """Install change tracking for a view: see :meth:`enable_change_tracking`."""

    def __init__(
        self,
        name: str,
        sources: Sources,
        *,
        schema: str | None = None,
        tracking_schema: str | None = None,
    ) -> None:
        self.name = name
        self.sources = _sources(sources) or ()
        self.schema = schema
        self.tracking_schema = tracking_schema

    @classmethod
    def enable_change_tracking(
        cls,
        operations: Operations,
        name: str,
        sources: Sources,
        *,
        schema: str | None = None,
        tracking_schema: str | None = None,
    ) -> None:
        """Install statement-level triggers on ``sources`` that mark the view stale.

        ``sources`` lists the ``(schema, table)`` pairs the view reads (``None`` for the
        default schema). ``tracking_schema`` names the bookkeeping schema when it is not
        the default (see :func:`~sqlalchemy_matview.set_tracking_schema`). See
        :mod:`sqlalchemy_matview.orchestration.tracking`.

        Example::

            op.enable_change_tracking("mv_daily", [(None, "events")])
        """
        operations.invoke(cls(name, sources, schema=schema, tracking_schema=tracking_schema))

    def reverse(self) -> DisableChangeTrackingOp:
        return DisableChangeTrackingOp(
            self.name,
            schema=self.schema,
            sources=self.sources,
            tracking_schema=self.tracking_schema,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("enable_change_tracking", self.schema, self.name, self.sources)


@Operations.register_operation("disable_change_tracking")
class DisableChangeTrackingOp(MigrateOperation):
    """Remove the change tracking of a view: see :meth:`disable_change_tracking`."""

    def __init__(
        self,
        name: str,
        *,
        schema: str | None = None,
        sources: Sources | None = None,
        tracking_schema: str | None = None,
    ) -> None:
        self.name = name
        self.schema = schema
        self.sources = _sources(sources)
        self.tracking_schema = tracking_schema

    @classmethod
    def disable_change_tracking(
        cls,
        operations: Operations,
        name: str,
        *,
        schema: str | None = None,
        sources: Sources | None = None,
        tracking_schema: str | None = None,
    ) -> None:
        """Remove the view's change-tracking triggers and state.

        ``sources`` is only used by the reverse operation, which installs tracking again.

        Example::

            op.disable_change_tracking("mv_daily", sources=[(None, "events")])
        """
        operations.invoke(
            cls(name, schema=schema, sources=sources, tracking_schema=tracking_schema)
        )

    def reverse(self) -> EnableChangeTrackingOp:
        if self.sources is None:
            raise IrreversibleOperationError(
                f"disable_change_tracking({self.name!r}) cannot be reversed: it does not know "
                "the view's source tables; pass sources=[(schema, table), ...]"
            )
        return EnableChangeTrackingOp(
            self.name, self.sources, schema=self.schema, tracking_schema=self.tracking_schema
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("disable_change_tracking", self.schema, self.name)


@Operations.register_operation("create_plain_view")
class CreatePlainViewOp(MigrateOperation):
    """``CREATE VIEW``: see :meth:`create_plain_view`."""

    def __init__(
        self,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        comment: str | None = None,
        options: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.definition = definition
        self.schema = schema
        self.comment = comment
        self.options = tuple(options) if options is not None else None
        self.grants = _grants(name, grants)
        self.owner = owner

    @classmethod
    def create_plain_view(
        cls,
        operations: Operations,
        name: str,
        definition: Definition,
        *,
        schema: str | None = None,
        comment: str | None = None,
        options: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        """Create a plain (not materialized) view.

        Autogenerate writes it to re-create a view that reads a materialized view it drops
        and creates again around table changes; it does not manage plain views otherwise.
        ``options`` are the view's ``key=value`` options, such as ``security_barrier=true``.
        ``grants`` and ``owner`` are restored as by :meth:`create_materialized_view`.

        Example::

            op.create_plain_view(
                "big_totals", "SELECT kind, n FROM mv_totals WHERE n > 10",
                options=["security_barrier=true"],
            )
        """
        operations.invoke(
            cls(
                name,
                definition,
                schema=schema,
                comment=comment,
                options=options,
                grants=grants,
                owner=owner,
            )
        )

    def reverse(self) -> DropPlainViewOp:
        return DropPlainViewOp(
            self.name,
            schema=self.schema,
            definition=self.definition,
            comment=self.comment,
            options=self.options,
            grants=self.grants,
            owner=self.owner,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("create_plain_view", self.schema, self.name, _sql(self.definition))


@Operations.register_operation("drop_plain_view")
class DropPlainViewOp(MigrateOperation):
    """``DROP VIEW``: see :meth:`drop_plain_view`."""

    def __init__(
        self,
        name: str,
        *,
        schema: str | None = None,
        definition: Definition | None = None,
        comment: str | None = None,
        options: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.schema = schema
        self.definition = definition
        self.comment = comment
        self.options = tuple(options) if options is not None else None
        self.grants = _grants(name, grants)
        self.owner = owner

    @classmethod
    def drop_plain_view(
        cls,
        operations: Operations,
        name: str,
        *,
        schema: str | None = None,
        definition: Definition | None = None,
        comment: str | None = None,
        options: Sequence[str] | None = None,
        grants: Sequence[GrantSpec] | None = None,
        owner: str | None = None,
    ) -> None:
        """Drop a plain view; ``definition``, ``comment``, ``options``, ``grants`` and
        ``owner`` make it reversible.

        Example::

            op.drop_plain_view("big_totals", definition="SELECT kind, n FROM mv_totals")
        """
        operations.invoke(
            cls(
                name,
                schema=schema,
                definition=definition,
                comment=comment,
                options=options,
                grants=grants,
                owner=owner,
            )
        )

    def reverse(self) -> CreatePlainViewOp:
        if self.definition is None:
            raise IrreversibleOperationError(
                f"drop_plain_view({self.name!r}) cannot be reversed: it does not know the "
                "view's definition; pass definition='SELECT ...'"
            )
        return CreatePlainViewOp(
            self.name,
            self.definition,
            schema=self.schema,
            comment=self.comment,
            options=self.options,
            grants=self.grants,
            owner=self.owner,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_plain_view", self.schema, self.name)


@Operations.register_operation("create_incremental_view")
class CreateIncrementalViewOp(MigrateOperation):
    """Create and fill an incremental view: see :meth:`create_incremental_view`."""

    def __init__(
        self,
        name: str,
        statements: Sequence[str],
        *,
        schema: str | None = None,
        drop_statements: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.statements = tuple(statements)
        self.schema = schema
        self.drop_statements = tuple(drop_statements) if drop_statements is not None else None

    @classmethod
    def create_incremental_view(
        cls,
        operations: Operations,
        name: str,
        statements: Sequence[str],
        *,
        schema: str | None = None,
        drop_statements: Sequence[str] | None = None,
    ) -> None:
        """Create an incremental view: its table, dirty-bucket log, trigger functions,
        triggers on its sources and refresh function, then fill it, in the migration's
        transaction (``CREATE TRIGGER`` keeps writers out until it commits, so no write
        falls between the fill and the log).

        ``statements`` are the SQL that ``create_all`` runs for the view, which autogenerate
        captures from the declaration and writes out literally, so that the migration does
        not depend on the models as they are later, and ``alembic upgrade --sql`` prints
        them for ``psql``. ``drop_statements`` (written by autogenerate) make it reversible.
        See ``docs/incremental.md``.

        Example::

            op.create_incremental_view(
                "mv_daily",
                ["CREATE TABLE mv_daily (day, n) AS SELECT ... WITH NO DATA", "..."],
                drop_statements=["DROP FUNCTION IF EXISTS ...", "..."],
            )
        """
        operations.invoke(cls(name, statements, schema=schema, drop_statements=drop_statements))

    def reverse(self) -> DropIncrementalViewOp:
        if self.drop_statements is None:
            raise IrreversibleOperationError(
                f"create_incremental_view({self.name!r}) cannot be reversed: pass "
                "drop_statements=[...] (autogenerate writes them)"
            )
        return DropIncrementalViewOp(
            self.name,
            self.drop_statements,
            schema=self.schema,
            create_statements=self.statements,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("create_incremental_view", self.schema, self.name)


@Operations.register_operation("drop_incremental_view")
class DropIncrementalViewOp(MigrateOperation):
    """Drop an incremental view and all it owns: see :meth:`drop_incremental_view`."""

    def __init__(
        self,
        name: str,
        statements: Sequence[str],
        *,
        schema: str | None = None,
        create_statements: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.statements = tuple(statements)
        self.schema = schema
        self.create_statements = tuple(create_statements) if create_statements is not None else None

    @classmethod
    def drop_incremental_view(
        cls,
        operations: Operations,
        name: str,
        statements: Sequence[str],
        *,
        schema: str | None = None,
        create_statements: Sequence[str] | None = None,
    ) -> None:
        """Drop an incremental view: its trigger functions (and so the triggers on its
        sources), statistics, refresh function, log and table.

        ``statements`` are those drops as autogenerate read them from the catalog;
        ``create_statements`` re-create every object as it was and refill the table (a full
        recompute by the view's refresh function): the reverse.

        Example::

            op.drop_incremental_view(
                "mv_daily",
                ["DROP FUNCTION IF EXISTS ... CASCADE", "...", "DROP TABLE IF EXISTS mv_daily"],
            )
        """
        operations.invoke(cls(name, statements, schema=schema, create_statements=create_statements))

    def reverse(self) -> CreateIncrementalViewOp:
        if self.create_statements is None:
            raise IrreversibleOperationError(
                f"drop_incremental_view({self.name!r}) cannot be reversed: pass "
                "create_statements=[...] (autogenerate writes them)"
            )
        return CreateIncrementalViewOp(
            self.name,
            self.create_statements,
            schema=self.schema,
            drop_statements=self.statements,
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_incremental_view", self.schema, self.name)


# The implementations register themselves against the classes above.
from . import toimpl as _toimpl  # noqa: E402

del _toimpl
