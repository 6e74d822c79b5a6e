"""The declaration: :class:`MaterializedView`, a typed read-only ``Table`` plus its query.

A materialized view lives in the user's ``MetaData`` as an ordinary :class:`~sqlalchemy.Table`
whose creation and removal DDL are swapped for ``CREATE/DROP MATERIALIZED VIEW``. Keeping it a
real ``Table`` is what lets ``create_all`` order it after its sources, create its indexes,
honour ``checkfirst``, and lets the ORM map it like any other table.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import NullType

from . import _compat, bookkeeping
from .errors import DefinitionError
from .incremental import Incremental, incremental_hooks
from .query import Definition, Query, as_query, check_query

if TYPE_CHECKING:
    from sqlalchemy.sql.base import ReadOnlyColumnCollection

__all__ = [
    "REPLACE_STRATEGIES",
    "Definition",
    "MaterializedView",
    "materialized_view_of",
    "materialized_views",
    "unique_key_index_name",
]

#: Key under which a view's ``Table.info`` points back at its :class:`MaterializedView`.
INFO_KEY = "sqlalchemy_matview"
#: Key under which ``MetaData.info`` holds every view declared on it, managed or not.
REGISTRY_KEY = "sqlalchemy_matview.views"

_MAX_IDENTIFIER_BYTES = 63

#: How a migration gives a view a new definition (see ``replace_strategy=``):
#: ``"drop_create"`` drops it and creates it again in the migration's transaction;
#: ``"side_by_side"`` builds the new version next to the old one while readers keep reading,
#: then swaps them in one short transaction.
REPLACE_STRATEGIES = ("drop_create", "side_by_side")


def check_replace_strategy(value: object, label: str) -> str | None:
    """``value`` if it is ``None`` or one of :data:`REPLACE_STRATEGIES`, else raise.

    >>> check_replace_strategy("side_by_side", "view 'mv'")
    'side_by_side'
    """
    if value is None or value in REPLACE_STRATEGIES:
        return value
    raise DefinitionError(
        f"{label}: replace_strategy={value!r} is not a strategy; pass "
        f"{' or '.join(repr(s) for s in REPLACE_STRATEGIES)} (or None for the default)"
    )


def unique_key_index_name(view_name: str) -> str:
    """Name of the unique index that ``unique_key=`` creates for the view ``view_name``.

    It is ``<view name>_unique_key`` when that fits PostgreSQL's 63-byte identifier limit;
    longer names keep a prefix of the view name and end in 8 hex digits of a SHA-1 of the full
    name, so two long view names never share an index name.

    >>> unique_key_index_name("mv_dashboard")
    'mv_dashboard_unique_key'
    >>> len(unique_key_index_name("x" * 63).encode())
    63
    """
    name = f"{view_name}_unique_key"
    if len(name.encode()) <= _MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(view_name.encode()).hexdigest()[:8]
    suffix = f"_{digest}_uk"
    budget = _MAX_IDENTIFIER_BYTES - len(suffix)
    prefix = view_name.encode()[:budget].decode(errors="ignore")
    return prefix + suffix


class MaterializedView:
    """A PostgreSQL materialized view, declared next to the tables it reads.

    ``definition`` is a :func:`~sqlalchemy.select` or a compound select such as
    :func:`~sqlalchemy.union` (column names and types are inferred from it), or SQL as
    :func:`~sqlalchemy.text` / ``str`` (then ``columns=`` must give every column with its
    type). A ``str`` is SQL exactly as written (its colons are never bind parameters) and,
    like a ``text()``, may end with ``;``, blanks and comments. The definition is checked and
    compiled for PostgreSQL here, so that a mistake raises
    :class:`~sqlalchemy_matview.errors.DefinitionError` from this call rather than from
    ``create_all``. The view is exposed as :attr:`table`, a real
    :class:`~sqlalchemy.Table` that can be queried, joined and mapped with the ORM, and
    that ``metadata.create_all()`` creates after everything it reads from.

    Example::

        import sqlalchemy as sa
        from sqlalchemy_matview import MaterializedView

        metadata = sa.MetaData()
        events = sa.Table(
            "events", metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("user_id", sa.Integer, nullable=False),
        )
        day = sa.cast(sa.func.date_trunc("day", events.c.created_at), sa.Date)
        mv_daily = MaterializedView(
            "mv_daily", metadata,
            sa.select(day.label("day"), sa.func.count().label("events")).group_by(day),
            unique_key="day",
        )
        assert [c.name for c in mv_daily.c] == ["day", "events"]

    :param name: the view's name, quoted by SQLAlchemy where needed.
    :param metadata: the ``MetaData`` whose ``create_all()`` / ``drop_all()`` manage it.
    :param definition: the query.
    :param schema: the view's schema (default: ``metadata.schema``).
    :param columns: typed ``Column`` objects; required for SQL definitions, and for a
        ``select()`` they override inferred columns of the same name.
    :param unique_key: a column name or names: a unique index is created on them (named by
        :func:`unique_key_index_name`), which allows ``REFRESH ... CONCURRENTLY``; they
        also form the ``Table``'s primary key so the ORM can map it.
    :param with_data: ``False`` creates the view ``WITH NO DATA``.
    :param managed: ``False`` declares a view that exists already and that this library
        must never create or drop: only its ``Table`` is provided, for queries and the ORM.
    :param comment: stored with ``COMMENT ON MATERIALIZED VIEW``.
    :param track_changes: install statement-level triggers on the view's source tables
        that mark it stale when they change (see :func:`sqlalchemy_matview.refresh_stale`).
    :param depends_on: extra objects the view reads from, for SQL definitions whose sources
        cannot be discovered (``Table`` or ``MaterializedView`` objects).
    :param replace_strategy: how migrations that change the definition replace the view:
        ``"drop_create"`` (drop it and create it again; readers wait for the rebuild) or
        ``"side_by_side"`` (build the new version while readers keep reading the old one,
        then swap them in milliseconds; see ``docs/alembic.md``). ``None`` (the default)
        leaves the choice to :func:`sqlalchemy_matview.alembic.register`, whose own default
        is ``"drop_create"``. Autogenerate writes it into the migration.
    :param max_staleness: the view's freshness objective, a positive ``timedelta``: how old
        its data may get. A ``RefreshWorker`` refreshes a tracked view no later than this
        after its first unrefreshed change (debounce cannot postpone it), and refreshes an
        untracked view at least this often; :func:`sqlalchemy_matview.freshness` and
        ``matview check`` report breaches. ``None``: no objective.
    :param incremental: an :class:`~sqlalchemy_matview.Incremental`: store the rows in a
        table named as the view, kept by triggers that log which buckets writes touch, and
        refresh only those buckets (see ``docs/incremental.md``). Its ``key`` becomes the
        table's primary key (and :attr:`unique_key`).
    """

    def __init__(
        self,
        name: str,
        metadata: sa.MetaData,
        definition: Definition,
        *,
        schema: str | None = None,
        columns: Sequence[sa.Column[Any]] | None = None,
        unique_key: str | Sequence[str] | None = None,
        with_data: bool = True,
        managed: bool = True,
        comment: str | None = None,
        track_changes: bool = False,
        depends_on: Iterable[sa.Table | MaterializedView] = (),
        replace_strategy: str | None = None,
        max_staleness: datetime.timedelta | None = None,
        incremental: Incremental | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise DefinitionError(f"a materialized view needs a non-empty name, got {name!r}")
        if len(name.encode()) > _MAX_IDENTIFIER_BYTES:
            raise DefinitionError(
                f"materialized view name {name!r} is {len(name.encode())} bytes long; "
                f"PostgreSQL truncates identifiers to {_MAX_IDENTIFIER_BYTES} bytes: "
                "choose a shorter name"
            )
        self.name = name
        self.metadata = metadata
        self.schema: str | None = schema if schema is not None else metadata.schema
        self.definition: Query = as_query(definition)
        self._sql = check_query(self.definition, f"materialized view {self._display}")
        self.with_data = with_data
        self.managed = managed
        self.comment = comment
        self.track_changes = track_changes
        self.replace_strategy: str | None = check_replace_strategy(
            replace_strategy, f"materialized view {self._display}"
        )
        self.max_staleness = self._check_max_staleness(max_staleness)
        if track_changes and not managed:
            raise DefinitionError(
                f"materialized view {self._display}: track_changes=True needs a managed view "
                "(its triggers are installed by create_all); drop managed=False or track_changes"
            )

        table_columns = self._build_columns(columns)
        #: The :class:`~sqlalchemy_matview.Incremental` declaration, or ``None``.
        self.incremental: Incremental | None = self._check_incremental(
            incremental, unique_key, table_columns
        )
        if self.incremental is not None:
            unique_key = self.incremental.key
        self.unique_key: tuple[str, ...] = self._check_unique_key(unique_key, table_columns)
        for column in table_columns:
            if column.name in self.unique_key:
                column.primary_key = True
                column.nullable = False

        registry = _registry(metadata)
        key = (self.schema, name)
        if key in registry:
            raise DefinitionError(
                f"materialized view {self._display} is already declared on this MetaData; "
                "declare each view once (or use a separate MetaData)"
            )
        # Unmanaged views must stay out of the user's MetaData, or create_all/drop_all would
        # act on them; a private MetaData still gives the ORM a Table to map.
        owner = metadata if managed else sa.MetaData()
        if managed and sa.Table(name, sa.MetaData(), schema=self.schema).key in metadata.tables:
            raise DefinitionError(
                f"materialized view {self._display}: a table of that name is already in the "
                "MetaData; give the view another name"
            )
        self.table: sa.Table = sa.Table(
            name, owner, *table_columns, schema=self.schema, info={INFO_KEY: self}
        )
        if self.unique_key and self.incremental is None:
            sa.Index(
                unique_key_index_name(name),
                *(self.table.c[k] for k in self.unique_key),
                unique=True,
            )
        self.sources: tuple[sa.Table, ...] = self._find_sources(depends_on)
        if managed:
            for source in self.sources:
                if source.metadata is metadata and source is not self.table:
                    self.table.add_is_dependent_on(source)
            _compat.install_ddl(self)
            if self.incremental is not None:
                # The table, its triggers and its log are created and dropped by the
                # orchestration layer, loaded when first needed (incremental_hooks); every
                # create_all repairs the triggers of those that exist already.
                if not sa.event.contains(metadata, "after_create", _incremental_repair):
                    sa.event.listen(metadata, "after_create", _incremental_repair)
                sa.event.listen(self.table, "before_create", _incremental_before_create)
                sa.event.listen(self.table, "after_create", _incremental_after_create)
                sa.event.listen(self.table, "before_drop", _incremental_before_drop)
            if track_changes:
                # create_all installs the triggers, drop_all removes them; the
                # orchestration layer does it (bookkeeping.tracking_hooks).
                # On the MetaData, so that it runs on every create_all, also when the view
                # exists already: tracking is repaired (or moved from 0.1.0's layout).
                if not sa.event.contains(metadata, "after_create", _tracking_after_create):
                    sa.event.listen(metadata, "after_create", _tracking_after_create)
                sa.event.listen(self.table, "after_create", _tracking_after_create_view)
                sa.event.listen(self.table, "before_drop", _tracking_before_drop)
        registry[key] = self
        from . import readonly

        readonly.install()

    # -- declaration helpers -------------------------------------------------------------

    def _check_max_staleness(self, value: object) -> datetime.timedelta | None:
        if value is None:
            return None
        if not isinstance(value, datetime.timedelta) or value <= datetime.timedelta(0):
            raise DefinitionError(
                f"materialized view {self._display}: max_staleness must be a positive "
                f"datetime.timedelta (e.g. timedelta(minutes=5)), not {value!r}"
            )
        return value

    def _check_incremental(
        self,
        incremental: object,
        unique_key: str | Sequence[str] | None,
        columns: list[sa.Column[Any]],
    ) -> Incremental | None:
        if incremental is None:
            return None
        if not isinstance(incremental, Incremental):
            raise DefinitionError(
                f"materialized view {self._display}: incremental= takes an "
                f"Incremental(key=..., sources={{...}}), not {incremental!r}"
            )
        incremental.bind(self, [c.name for c in columns])
        if unique_key is not None:
            given = (unique_key,) if isinstance(unique_key, str) else tuple(unique_key)
            if set(given) != set(incremental.key):
                raise DefinitionError(
                    f"materialized view {self._display}: unique_key={unique_key!r} differs from "
                    f"the incremental key {list(incremental.key)}, which is the table's primary "
                    "key; drop unique_key="
                )
        return incremental

    @property
    def _display(self) -> str:
        return repr(self.fullname) if hasattr(self, "schema") else repr(self.name)

    def _build_columns(self, columns: Sequence[sa.Column[Any]] | None) -> list[sa.Column[Any]]:
        given: dict[str, sa.Column[Any]] = {}
        for column in columns or ():
            if not isinstance(column, sa.Column):
                raise DefinitionError(
                    f"materialized view {self._display}: columns= takes sa.Column objects, "
                    f"got {column!r}"
                )
            given[column.name] = column

        if isinstance(self.definition, TextClause):
            if not given:
                raise DefinitionError(
                    f"materialized view {self._display} is defined by SQL text, so its columns "
                    "cannot be inferred: pass columns=[sa.Column('name', sa.Integer), ...] "
                    "with one typed Column per output column, in order"
                )
            inferred: list[tuple[str, Any]] = [(c.name, c.type) for c in given.values()]
        else:
            inferred = []
            for key, expr in self.definition.selected_columns.items():
                if key.startswith("_no_label"):
                    raise DefinitionError(
                        f"materialized view {self._display}: output column {expr} has no name; "
                        "give it one with .label('name')"
                    )
                inferred.append((key, expr.type))
            names = [n for n, _ in inferred]
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise DefinitionError(
                    f"materialized view {self._display}: columns= names {unknown} are not "
                    f"output columns of the select (those are {names})"
                )

        built: list[sa.Column[Any]] = []
        for name, type_ in inferred:
            override = given.get(name)
            if override is not None:
                type_ = override.type
            if isinstance(type_, NullType):
                raise DefinitionError(
                    f"materialized view {self._display}: the type of column {name!r} cannot be "
                    "inferred; cast it (sa.cast(expr, sa.Integer)), give the function a type "
                    f"(sa.func.f(..., type_=sa.Integer)), or pass columns=[sa.Column({name!r}, "
                    "<type>)]"
                )
            built.append(
                sa.Column(
                    name,
                    type_,
                    comment=override.comment if override is not None else None,
                    nullable=override.nullable if override is not None else True,
                )
            )
        return built

    def _check_unique_key(
        self, unique_key: str | Sequence[str] | None, columns: list[sa.Column[Any]]
    ) -> tuple[str, ...]:
        if unique_key is None:
            return ()
        keys = (unique_key,) if isinstance(unique_key, str) else tuple(unique_key)
        if not keys:
            raise DefinitionError(
                f"materialized view {self._display}: unique_key is empty; name at least one "
                "column or pass None"
            )
        names = [c.name for c in columns]
        missing = [k for k in keys if k not in names]
        if missing:
            raise DefinitionError(
                f"materialized view {self._display}: unique_key columns {missing} are not "
                f"columns of the view (those are {names})"
            )
        if len(set(keys)) != len(keys):
            raise DefinitionError(
                f"materialized view {self._display}: unique_key {list(keys)} repeats a column"
            )
        return keys

    def _find_sources(
        self, depends_on: Iterable[sa.Table | MaterializedView]
    ) -> tuple[sa.Table, ...]:
        found: dict[int, sa.Table] = {}
        for obj in depends_on:
            table = obj.table if isinstance(obj, MaterializedView) else obj
            if not isinstance(table, sa.Table):
                raise DefinitionError(
                    f"materialized view {self._display}: depends_on takes Table or "
                    f"MaterializedView objects, got {obj!r}"
                )
            found[id(table)] = table
        if not isinstance(self.definition, TextClause):
            for element in visitors.iterate(self.definition):
                if isinstance(element, sa.Table):
                    found[id(element)] = element
        return tuple(found.values())

    # -- public attributes ---------------------------------------------------------------

    @property
    def c(self) -> ReadOnlyColumnCollection[str, sa.Column[Any]]:
        """The view's columns (``mv.c.day``), as on a ``Table``."""
        return self.table.c

    @property
    def columns(self) -> ReadOnlyColumnCollection[str, sa.Column[Any]]:
        """Synonym for :attr:`c`."""
        return self.table.c

    @property
    def fullname(self) -> str:
        """``schema.name`` when the view has a schema, else ``name`` (unquoted)."""
        return f"{self.schema}.{self.name}" if self.schema else self.name

    @property
    def sql(self) -> str:
        """The definition as SQL for PostgreSQL, values written in: what migrations carry.

        >>> import sqlalchemy as sa
        >>> t = sa.table("events", sa.column("kind", sa.Text))
        >>> mv = MaterializedView("mv_kinds", sa.MetaData(), sa.select(t.c.kind).distinct())
        >>> print(mv.sql)  # doctest: +NORMALIZE_WHITESPACE
        SELECT DISTINCT events.kind
        FROM events
        """
        return self._sql

    @property
    def indexes(self) -> set[sa.Index]:
        """The indexes on the view, including the ``unique_key`` one."""
        return self.table.indexes

    def __repr__(self) -> str:
        schema = f", schema={self.schema!r}" if self.schema else ""
        managed = "" if self.managed else ", managed=False"
        return f"MaterializedView({self.name!r}{schema}{managed})"

    # -- DDL -----------------------------------------------------------------------------

    def create(self, bind: Engine | Connection, checkfirst: bool = True) -> None:
        """Create the view and its indexes (``checkfirst``: only when it does not exist yet)."""
        self._require_managed("create")
        self.table.create(bind, checkfirst=checkfirst)

    def drop(
        self, bind: Engine | Connection, checkfirst: bool = True, cascade: bool = False
    ) -> None:
        """Drop the view (``cascade=True`` also drops whatever depends on it)."""
        self._require_managed("drop")
        if not cascade or self.incremental is not None:
            if cascade:
                raise DefinitionError(
                    f"incremental view {self._display}: drop(cascade=True) is not supported; "
                    "drop the views reading it first, then drop it"
                )
            self.table.drop(bind, checkfirst=checkfirst)
            return
        from .ddl import DropMaterializedView

        statement = DropMaterializedView(self, if_exists=checkfirst, cascade=True)
        if isinstance(bind, Engine):
            with bind.begin() as conn:
                conn.execute(statement)
        else:
            bind.execute(statement)

    def _require_managed(self, action: str) -> None:
        if not self.managed:
            raise DefinitionError(
                f"materialized view {self._display} is declared managed=False, so "
                f"sqlalchemy-matview does not {action} it; manage it yourself or declare it "
                "with managed=True"
            )

    # -- reflection ----------------------------------------------------------------------

    @classmethod
    def reflect(
        cls,
        name: str,
        metadata: sa.MetaData,
        bind: Engine | Connection,
        *,
        schema: str | None = None,
    ) -> MaterializedView:
        """Build a ``managed=False`` view from what the database says about ``name``.

        Columns come typed from the catalog, the definition is PostgreSQL's own text, and a
        qualifying unique index becomes the :attr:`unique_key`, so ``refresh(mv)`` may run
        concurrently. Raises :class:`~sqlalchemy_matview.errors.UnknownViewError` when there
        is no such materialized view.
        """
        from .reflection import reflect_view

        return reflect_view(cls, name, metadata, bind, schema=schema)


def _registry(metadata: sa.MetaData) -> dict[tuple[str | None, str], MaterializedView]:
    registry: dict[tuple[str | None, str], MaterializedView] = metadata.info.setdefault(
        REGISTRY_KEY, {}
    )
    return registry


def materialized_views(
    metadata: sa.MetaData, *, managed: bool | None = None
) -> list[MaterializedView]:
    """Every materialized view declared on ``metadata``, in declaration order.

    ``managed=True`` / ``False`` keeps only managed / unmanaged views.

    >>> import sqlalchemy as sa
    >>> md = sa.MetaData()
    >>> materialized_views(md)
    []
    """
    views = list(_registry(metadata).values())
    if managed is None:
        return views
    return [v for v in views if v.managed is managed]


def materialized_view_of(target: object) -> MaterializedView | None:
    """The :class:`MaterializedView` behind ``target`` (the view, its ``Table``, or an ORM
    class mapped to it), or ``None`` when ``target`` is not one of ours."""
    if isinstance(target, MaterializedView):
        return target
    table = _table_of(target)
    if table is None:
        return None
    view = table.info.get(INFO_KEY)
    return view if isinstance(view, MaterializedView) else None


def _table_of(target: object) -> sa.Table | None:
    if isinstance(target, sa.Table):
        return target
    if isinstance(target, MaterializedView):
        return target.table
    if isinstance(target, type):
        mapper: Any = sa.inspect(target, raiseerr=False)
        local = getattr(mapper, "local_table", None)
        if isinstance(local, sa.Table):
            return local
    return None


def _tracking_after_create(target: sa.MetaData, connection: Any, **kw: Any) -> None:
    tracked = [v for v in materialized_views(target, managed=True) if v.track_changes]
    if tracked:
        bookkeeping.tracking_hooks()[0](tracked, connection, **kw)


def _tracking_after_create_view(target: sa.Table, connection: Any, **kw: Any) -> None:
    view = target.info.get(INFO_KEY)
    if isinstance(view, MaterializedView) and view.track_changes:
        bookkeeping.tracking_hooks()[0]([view], connection, **kw)


def _tracking_before_drop(target: sa.Table, connection: Any, **kw: Any) -> None:
    view = target.info.get(INFO_KEY)
    if isinstance(view, MaterializedView):
        bookkeeping.tracking_hooks()[1](view, connection, **kw)


def _incremental_repair(target: sa.MetaData, connection: Any, **kw: Any) -> None:
    views = [v for v in materialized_views(target, managed=True) if v.incremental is not None]
    if views:
        incremental_hooks()["repair"](views, connection)


def _incremental_before_create(target: sa.Table, connection: Any, **kw: Any) -> None:
    incremental_hooks()["before_create"](target.info[INFO_KEY], connection)


def _incremental_after_create(target: sa.Table, connection: Any, **kw: Any) -> None:
    incremental_hooks()["after_create"](target.info[INFO_KEY], connection)


def _incremental_before_drop(target: sa.Table, connection: Any, **kw: Any) -> None:
    incremental_hooks()["before_drop"](target.info[INFO_KEY], connection)
