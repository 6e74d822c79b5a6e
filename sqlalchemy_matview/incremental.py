"""Incremental views: :class:`Incremental`, the declaration of a view refreshed per bucket.

Declaration layer: this module checks a declaration and names the objects an incremental view
owns; creating, dropping and refreshing them is
:mod:`sqlalchemy_matview.orchestration.incremental`'s job, loaded when first needed (like a
plugin, so that importing :mod:`sqlalchemy_matview.schema` never imports the orchestration).

An incremental view stores its rows in a real table named as the view, with a primary key on
:attr:`Incremental.key`. Statement-level triggers on every source log which *buckets* (values
of the key) each write touched; a refresh recomputes only those buckets with the view's own
query, restricted to them, and falls back to recomputing everything when the dirty buckets
hold more than :attr:`Incremental.full_refresh_above` of the source rows.

>>> import sqlalchemy as sa
>>> from sqlalchemy_matview import Incremental, MaterializedView
>>> md = sa.MetaData()
>>> events = sa.Table(
...     "events", md,
...     sa.Column("id", sa.Integer, primary_key=True),
...     sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
...     sa.Column("user_id", sa.Integer, nullable=False),
... )
>>> day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)   # IMMUTABLE
>>> mv_daily = MaterializedView(
...     "mv_daily", md,
...     sa.select(day.label("day"), sa.func.count().label("events")).group_by(day),
...     incremental=Incremental(key="day", sources={events: day}),
... )
>>> mv_daily.incremental.key
('day',)
>>> mv_daily.unique_key
('day',)
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import (
    Cast,
    ClauseElement,
    ColumnElement,
    Extract,
    Label,
    Over,
    TextClause,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Exists, ScalarSelect, Select

from .errors import DefinitionError

if TYPE_CHECKING:
    from .schema import MaterializedView

__all__ = ["Incremental", "IncrementalNames", "incremental_hooks", "names_for", "stored_name"]

#: Functions whose result changes without any write (time, randomness, sequences, session
#: state): a definition or bucket using them is not a function of its bucket's rows.
NOT_REPEATABLE = frozenset(
    {
        "now",
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "random",
        "random_normal",
        "setseed",
        "nextval",
        "currval",
        "lastval",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "uuidv4",
        "uuidv7",
        "txid_current",
        "pg_current_xact_id",
        "current_setting",
        "current_user",
        "session_user",
        "current_role",
        "user",
        "current_schema",
        "inet_client_addr",
        "pg_backend_pid",
    }
)

#: Functions that read the session's TimeZone when given a ``timestamptz``.
_ZONE_DEPENDENT = frozenset(
    {"date_trunc", "date_part", "to_char", "date", "age", "date_bin", "extract", "justify_days"}
)

#: Set-returning functions: several rows per group, or rows that are not a group's.
_SET_RETURNING = frozenset(
    {
        "generate_series",
        "unnest",
        "jsonb_array_elements",
        "json_array_elements",
        "jsonb_array_elements_text",
        "json_array_elements_text",
        "jsonb_each",
        "json_each",
        "regexp_matches",
        "string_to_table",
        "generate_subscripts",
    }
)

_WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_IMMUTABLE_DAY = 'sa.cast(sa.func.timezone("UTC", {col}), sa.Date)'


class Incremental:
    """Makes a :class:`~sqlalchemy_matview.MaterializedView` incremental.

    Its rows are stored in a table named as the view (primary key: ``key``), kept by
    triggers on the sources that log the buckets each write touches; a refresh
    (:func:`~sqlalchemy_matview.refresh_views`, :func:`~sqlalchemy_matview.refresh_stale`,
    workers, pg_cron jobs) recomputes only the dirty buckets, in one transaction: readers
    never wait and never see half a refresh.

    :param key: the view column (or columns) identifying a bucket: a ``GROUP BY``
        expression of the definition, e.g. a UTC day or a user id.
    :param sources: every table the definition reads, mapped to the SQL expression, over
        that table's columns, that gives a row's bucket (a tuple of expressions for a
        key of several columns). Each must be IMMUTABLE: it is computed by the writers'
        triggers, in their sessions, so ``date_trunc('day', timestamptz)`` (which depends
        on the session's ``TimeZone``) is refused; name the zone instead,
        ``sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)``.
    :param full_refresh_above: when the dirty buckets hold more than this fraction of the
        source rows (planner estimates), a refresh recomputes everything instead (still
        without blocking readers). In ``(0, 1]``; ``1`` never falls back.
    :param realtime: ``True``: the name is a plain view showing the stored rows of clean
        buckets plus a live computation of the dirty ones, so reads are always current
        (a reader's own uncommitted writes included); the rows are stored in the table
        :func:`stored_name` gives, next to it. A read then costs the recompute of every
        bucket dirty at that moment (one for a busy "today"; everything after a TRUNCATE
        until the next refresh). Indexes declared on such a view are created on that table.

    Example::

        day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
        mv_daily = MaterializedView(
            "mv_daily", metadata,
            sa.select(day.label("day"), sa.func.count().label("events")).group_by(day),
            incremental=Incremental(key="day", sources={events: day}),
        )
    """

    def __init__(
        self,
        key: str | Sequence[str],
        sources: Mapping[sa.Table, ColumnElement[Any] | Sequence[ColumnElement[Any]]],
        *,
        full_refresh_above: float = 0.25,
        realtime: bool = False,
    ) -> None:
        self.key: tuple[str, ...] = (key,) if isinstance(key, str) else tuple(key)
        self._raw_key = key
        self._raw_sources = sources
        self.full_refresh_above = full_refresh_above
        self.realtime = realtime
        #: ``source table -> bucket expressions`` (one per key column), checked.
        self.sources: dict[sa.Table, tuple[ColumnElement[Any], ...]] = {}
        self.view: MaterializedView | None = None

    def __repr__(self) -> str:
        key = self.key[0] if len(self.key) == 1 else list(self.key)
        sources = ", ".join(t.fullname for t in self.sources or self._raw_sources)
        return (
            f"Incremental(key={key!r}, sources=[{sources}], "
            f"full_refresh_above={self.full_refresh_above!r}"
            + (", realtime=True)" if self.realtime else ")")
        )

    # -- checks, made by MaterializedView.__init__ ----------------------------------------

    def bind(self, view: MaterializedView, names: Sequence[str]) -> None:
        """Check this declaration against ``view``, whose columns are ``names`` (raises
        ``DefinitionError``); called by ``MaterializedView`` before its table exists."""
        label = f"incremental view {view._display}"
        if self.view is not None and self.view is not view:
            raise DefinitionError(
                f"{label}: this Incremental(...) already belongs to view {self.view.fullname!r}; "
                "give each view its own"
            )
        _check_options(self, label, view)
        definition = view.definition
        if not isinstance(definition, Select):
            raise DefinitionError(
                f"{label}: an incremental view needs a select() definition (SQL text and "
                "unions cannot be restricted to a bucket); write it with sa.select(...)"
            )
        names = list(names)
        missing = [k for k in self.key if k not in names]
        if missing or not self.key or len(set(self.key)) != len(self.key):
            raise DefinitionError(
                f"{label}: key={self._raw_key!r} must name distinct columns of the view "
                f"(those are {names})"
            )
        key_exprs = _key_expressions(definition, self.key)
        _check_grouped(label, definition, self.key, key_exprs)
        _check_repeatable(label, definition)
        self.sources = _check_sources(label, self, view, key_exprs)
        self.view = view


def _check_options(inc: Incremental, label: str, view: MaterializedView) -> None:
    value = inc.full_refresh_above
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise DefinitionError(
            f"{label}: full_refresh_above={value!r} must be a fraction in (0, 1] (e.g. 0.25: "
            "recompute everything when a quarter of the rows are in dirty buckets; 1: never)"
        )
    if not isinstance(inc.realtime, bool):
        raise DefinitionError(
            f"{label}: realtime={inc.realtime!r} must be True or False (True: the view also "
            "computes its dirty buckets live when read)"
        )
    if not view.managed:
        raise DefinitionError(
            f"{label}: incremental=... needs a managed view (create_all creates its table and "
            "triggers); drop managed=False"
        )
    if view.track_changes:
        raise DefinitionError(
            f"{label}: track_changes=True is redundant: an incremental view logs the buckets "
            "its sources' writes touch, and refresh_stale refreshes it when that log is not "
            "empty; drop track_changes=True"
        )
    if not view.with_data:
        raise DefinitionError(
            f"{label}: with_data=False is not supported: the table is filled in the "
            "transaction that installs its triggers; drop with_data=False"
        )
    if not isinstance(inc._raw_sources, Mapping) or not inc._raw_sources:
        raise DefinitionError(
            f"{label}: sources= must map every table the definition reads to its bucket "
            "expression, e.g. sources={events: day}"
        )


def _sql(expr: ClauseElement) -> str:
    from .query import definition_sql

    return definition_sql(expr)


def _key_expressions(definition: Select[Any], key: tuple[str, ...]) -> list[ColumnElement[Any]]:
    selected = definition.selected_columns
    exprs = []
    for name in key:
        expr = selected[name]
        exprs.append(expr.element if isinstance(expr, Label) else expr)
    return exprs


def _check_grouped(
    label: str,
    definition: Select[Any],
    key: tuple[str, ...],
    key_exprs: list[ColumnElement[Any]],
) -> None:
    grouped = {_sql(g.element if isinstance(g, Label) else g) for g in definition._group_by_clauses}
    if not grouped:
        raise DefinitionError(
            f"{label}: the definition has no GROUP BY; an incremental view stores one row per "
            f"bucket, so group by the key ({', '.join(key)}): .group_by(<bucket expression>)"
        )
    for name, expr in zip(key, key_exprs, strict=True):
        if _sql(expr) not in grouped:
            raise DefinitionError(
                f"{label}: key column {name!r} is not a GROUP BY expression of the definition; "
                "a bucket must be a group: add it to .group_by(...) (the same expression)"
            )
    if definition._order_by_clauses:
        raise DefinitionError(
            f"{label}: ORDER BY has no meaning for stored rows and is not supported; order "
            "when you read the view (select(mv.table).order_by(...))"
        )
    if definition._limit_clause is not None or definition._offset_clause is not None:
        raise DefinitionError(
            f"{label}: LIMIT / OFFSET keep rows by their rank among all buckets, so a bucket's "
            "row is not a function of its own source rows; drop them (filter when reading)"
        )
    if definition._distinct_on:
        raise DefinitionError(
            f"{label}: DISTINCT ON picks rows across the whole result; it is not supported "
            "in an incremental view"
        )


def _function_name(element: FunctionElement[Any]) -> str:
    return str(getattr(element, "name", "") or "").lower()


def _not_repeatable_in(element: ClauseElement) -> str | None:
    """The first time-, randomness- or session-dependent function found in ``element``."""
    for node in visitors.iterate(element):
        if isinstance(node, FunctionElement):
            name = _function_name(node)
            if name in NOT_REPEATABLE:
                return f"{name}()"
        elif isinstance(node, TextClause):
            for word in _WORDS.findall(node.text):
                if word.lower() in NOT_REPEATABLE:
                    return str(word)
        elif isinstance(node, sa.sql.elements.ColumnClause) and node.is_literal:
            for word in _WORDS.findall(node.name):
                if word.lower() in NOT_REPEATABLE:
                    return str(word)
    return None


def _check_repeatable(label: str, definition: Select[Any]) -> None:
    found = _not_repeatable_in(definition)
    if found is not None:
        raise DefinitionError(
            f"{label}: the definition uses {found}, whose value changes without any write, so "
            "a stored bucket would go stale with nothing in its log; keep the view a function "
            "of its source rows (e.g. drop a now()-relative WHERE and filter when reading: "
            "select(mv.table).where(mv.c.day >= ...))"
        )
    for node in visitors.iterate(definition):
        if isinstance(node, Over):
            raise DefinitionError(
                f"{label}: window functions ({_sql(node)}) read rows across buckets; they are "
                "not supported in an incremental view (apply them when reading the view)"
            )
        if isinstance(node, (ScalarSelect, Exists)):
            raise DefinitionError(
                f"{label}: a subquery in the select list or WHERE can read rows of other "
                "buckets; join the table instead (or precompute it in another view)"
            )
        if (
            isinstance(node, FunctionElement)
            and _function_name(node) in _SET_RETURNING
            and any(node is c or _contains(c, node) for c in definition.selected_columns)
        ):
            raise DefinitionError(
                f"{label}: the set-returning function {_function_name(node)}() in the "
                "select list makes several rows per bucket; aggregate instead"
            )


def _contains(outer: ClauseElement, inner: ClauseElement) -> bool:
    return any(n is inner for n in visitors.iterate(outer))


def _tables_read(definition: Select[Any]) -> dict[int, sa.Table]:
    found: dict[int, sa.Table] = {}
    for element in visitors.iterate(definition):
        if isinstance(element, sa.Table):
            found[id(element)] = element
    return found


def _columns_of(expr: ClauseElement) -> list[sa.Column[Any]]:
    return [n for n in visitors.iterate(expr) if isinstance(n, sa.Column)]


def _check_sources(
    label: str,
    inc: Incremental,
    view: MaterializedView,
    key_exprs: list[ColumnElement[Any]],
) -> dict[sa.Table, tuple[ColumnElement[Any], ...]]:
    read = _tables_read(view.definition)  # type: ignore[arg-type]
    given: dict[sa.Table, tuple[ColumnElement[Any], ...]] = {}
    for table, buckets in inc._raw_sources.items():
        if not isinstance(table, sa.Table):
            raise DefinitionError(
                f"{label}: sources= keys are the Table objects the definition reads, got {table!r}"
            )
        if id(table) not in read:
            raise DefinitionError(
                f"{label}: sources= maps table {table.fullname!r}, which the definition does "
                f"not read (it reads {sorted(t.fullname for t in read.values())}); remove it"
            )
        exprs = (buckets,) if isinstance(buckets, ClauseElement) else tuple(buckets)
        if len(exprs) != len(inc.key) or not all(isinstance(e, ColumnElement) for e in exprs):
            raise DefinitionError(
                f"{label}: the bucket of {table.fullname!r} must be "
                + (
                    "one SQL expression over its columns"
                    if len(inc.key) == 1
                    else f"a tuple of {len(inc.key)} SQL expressions, one per key column"
                )
                + f", got {buckets!r}"
            )
        for expr in exprs:
            _check_bucket(label, table, expr)
        given[table] = exprs
    unmapped = [t.fullname for t in read.values() if t not in given]
    if unmapped:
        raise DefinitionError(
            f"{label}: the definition reads {unmapped} but sources= gives no bucket for "
            f"{'it' if len(unmapped) == 1 else 'them'}; a write there could change any bucket. "
            f"Map each table to the expression giving a row's bucket, e.g. "
            f"sources={{{unmapped[0].rsplit('.', 1)[-1]}: <expression over its columns>}}"
        )
    # Where the key is computed from a source's own columns, its bucket must be that very
    # expression: otherwise the trigger would log other buckets than the rows land in.
    for table, exprs in given.items():
        for name, key_expr, bucket in zip(inc.key, key_exprs, exprs, strict=True):
            key_tables = {id(c.table) for c in _columns_of(key_expr)}
            if key_tables == {id(table)} and _sql(key_expr) != _sql(bucket):
                raise DefinitionError(
                    f"{label}: the bucket of {table.fullname!r} ({_sql(bucket)}) is not the "
                    f"expression of key column {name!r} ({_sql(key_expr)}); pass the same "
                    "expression, so that writes are logged in the bucket their rows land in"
                )
    return given


def _check_bucket(label: str, table: sa.Table, expr: ColumnElement[Any]) -> None:
    columns = _columns_of(expr)
    if not columns:
        raise DefinitionError(
            f"{label}: the bucket of {table.fullname!r} ({_sql(expr)}) reads none of its "
            "columns; give the expression over its columns that says which bucket a row is in"
        )
    strangers = sorted({c.table.fullname for c in columns if c.table is not table})
    if strangers:
        raise DefinitionError(
            f"{label}: the bucket of {table.fullname!r} reads columns of {strangers}; the "
            "trigger on a table sees only that table's rows, so use its own columns"
        )
    found = _not_repeatable_in(expr)
    if found is not None:
        raise DefinitionError(
            f"{label}: the bucket of {table.fullname!r} uses {found}, which is not IMMUTABLE: "
            "the same row could be logged in another bucket than it is stored in; use an "
            "expression of the row's columns only"
        )
    zone = _zone_dependent(expr)
    if zone is not None:
        what, column = zone
        raise DefinitionError(
            f"{label}: the bucket of {table.fullname!r} applies {what} to the timestamptz "
            f"column {column.name!r}, which depends on the session's TimeZone (it is STABLE, "
            "not IMMUTABLE): writers in other time zones would log the wrong bucket and the "
            "change would be lost. Name the zone: "
            + _IMMUTABLE_DAY.format(col=f"{table.name}.c.{column.name}")
            + " (or date_bin on a timestamp without time zone)"
        )


def _is_timestamptz(node: object) -> bool:
    return (
        isinstance(node, sa.Column)
        and isinstance(node.type, sa.DateTime)
        and bool(node.type.timezone)
    )


def _zone_dependent(expr: ClauseElement) -> tuple[str, sa.Column[Any]] | None:
    for node in visitors.iterate(expr):
        if isinstance(node, FunctionElement) and _function_name(node) in _ZONE_DEPENDENT:
            for arg in node.clauses:
                if _is_timestamptz(arg):
                    return f"{_function_name(node)}()", arg  # type: ignore[return-value]
        elif isinstance(node, Extract) and _is_timestamptz(node.expr):
            return "extract()", node.expr  # type: ignore[return-value]
        elif isinstance(node, Cast) and _is_timestamptz(node.clause):
            target = node.type
            if not (isinstance(target, sa.DateTime) and target.timezone):
                return f"CAST(... AS {target.compile()})", node.clause  # type: ignore[return-value]
    return None


# -- names of the objects an incremental view owns -------------------------------------------


class IncrementalNames:
    """Names of a view's bookkeeping objects, all in the tracking schema.

    ``prefix`` is ``inc_`` and the first 12 hex digits of the MD5 of ``schema.name`` (the
    SQL side computes the same: ``left(md5(schema || '.' || name), 12)``).

    >>> n = names_for("public", "mv_daily")
    >>> n.log, n.whole, n.refresh
    ('inc_ba5c37bf108b_log', 'inc_ba5c37bf108b_all', 'inc_ba5c37bf108b_refresh')
    """

    def __init__(self, schema: str, name: str) -> None:
        digest = hashlib.md5(f"{schema}.{name}".encode()).hexdigest()[:12]
        self.prefix = f"inc_{digest}"
        #: The dirty-bucket log: key columns + ``xid`` (primary key: all of them).
        self.log = f"{self.prefix}_log"
        #: One row per transaction that truncated a source: everything is dirty.
        self.whole = f"{self.prefix}_all"
        #: ``refresh(lock_key, lock_mode, only_if_dirty, threshold)``.
        self.refresh = f"{self.prefix}_refresh"
        #: The sources' leaves (relations holding rows) and their files at the last refresh.
        self.leaves = f"{self.prefix}_leaves"
        #: ``reshaped()``: have the leaves changed since, and must everything be recomputed?
        self.reshaped = f"{self.prefix}_reshaped"

    def trigger_function(self, index: int) -> str:
        return f"{self.prefix}_src{index}"

    def statistics(self, index: int, position: int) -> str:
        return f"{self.prefix}_src{index}_stat{position}"

    def trigger(self, suffix: str) -> str:
        return f"sqlalchemy_matview_{self.prefix}_{suffix}"


def stored_name(view_name: str) -> str:
    """The table holding the rows of the realtime incremental view ``view_name`` (in its
    schema): ``<view name>__stored``, or a prefix and a hash when that is too long.

    >>> stored_name("mv_daily")
    'mv_daily__stored'
    """
    name = f"{view_name}__stored"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(view_name.encode()).hexdigest()[:8]
    prefix = view_name.encode()[: 63 - 10 - len(digest)].decode(errors="ignore")
    return f"{prefix}_{digest}__stored"


def names_for(schema: str, name: str) -> IncrementalNames:
    """The names of the objects of the incremental view ``schema.name``."""
    return IncrementalNames(schema, name)


# -- the seam between the declaration and its implementation ---------------------------------

_HOOKS: list[dict[str, Callable[..., Any]]] = []


def register_incremental_hooks(**hooks: Callable[..., Any]) -> None:
    """Called once by :mod:`sqlalchemy_matview.orchestration.incremental` on import."""
    if not _HOOKS:
        _HOOKS.append(hooks)


def incremental_hooks() -> dict[str, Callable[..., Any]]:
    """``before_create``, ``after_create``, ``before_drop`` for incremental views."""
    if not _HOOKS:
        importlib.import_module("sqlalchemy_matview.orchestration.incremental")
    return _HOOKS[0]
