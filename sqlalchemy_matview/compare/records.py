"""The records a comparison returns: plain, frozen data that any tool can act on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa

# Defined with the GRANT statement that checks them; part of the records' vocabulary.
from ..ddl import PRIVILEGES as PRIVILEGES
from ..ddl import PUBLIC as PUBLIC

#: ``(schema, name)`` of a view; ``None`` stands for the default schema.
Key = tuple[str | None, str]
#: ``(schema, name)`` as the catalog names it (the schema always given).
FullKey = tuple[str, str]


@dataclass(frozen=True)
class ReflectedIndex:
    """An index on a materialized view, as the catalog describes it."""

    name: str
    #: Schema of the view (``None``: the default schema).
    schema: str | None
    view_name: str
    unique: bool
    #: Each key element: a column name, or, for anything else, PostgreSQL's text of it with
    #: its collation, operator class and ordering (``lower(kind) text_pattern_ops DESC``).
    elements: tuple[str, ...]
    #: ``True`` where the matching element is a plain column, as is.
    is_column: tuple[bool, ...]
    #: ``pg_get_indexdef``: the full ``CREATE INDEX`` statement.
    definition: str
    method: str = "btree"
    #: The partial index's ``WHERE`` condition, if any.
    where: str | None = None
    #: ``INCLUDE`` columns.
    include: tuple[str, ...] = ()
    #: Storage parameters (``WITH (fillfactor='70')``), as ``(name, value)`` pairs.
    options: tuple[tuple[str, str], ...] = ()
    nulls_not_distinct: bool = False
    #: The definition without the index's and the view's names: two indexes of the same
    #: shape are the same index (see :mod:`sqlalchemy_matview.compare.indexes`).
    shape: str = ""
    #: ``pg_get_indexdef`` pretty-printed: the ``CREATE INDEX`` that re-creates it, naming
    #: the view without its schema when the ``search_path`` finds it.
    statement: str = ""

    def to_index(self) -> sa.Index:
        """An equivalent :class:`~sqlalchemy.Index` on a bare ``Table`` of the view.

        Used to build operations that re-create the index exactly (the reverse of a drop).
        """
        table = sa.Table(
            self.view_name,
            sa.MetaData(),
            *(
                sa.Column(element, sa.types.NullType())
                for element, column in zip(self.elements, self.is_column, strict=True)
                if column
            ),
            schema=self.schema,
        )
        exprs: list[Any] = [
            table.c[element] if column else sa.text(element)
            for element, column in zip(self.elements, self.is_column, strict=True)
        ]
        kwargs: dict[str, Any] = {}
        if self.method != "btree":
            kwargs["postgresql_using"] = self.method
        if self.include:
            kwargs["postgresql_include"] = list(self.include)
        if self.options:
            kwargs["postgresql_with"] = dict(self.options)
        if self.where is not None:
            kwargs["postgresql_where"] = sa.text(self.where)
        if self.nulls_not_distinct:
            kwargs["postgresql_nulls_not_distinct"] = True
        return sa.Index(self.name, *exprs, unique=self.unique, _table=table, **kwargs)


class Grant(NamedTuple):
    """One privilege on a view held by a role (or by ``PUBLIC``), as ``aclexplode`` lists it.

    Example::

        Grant("app_reader", "SELECT")           # GRANT SELECT ON v TO app_reader
        Grant("public", "SELECT")               # GRANT SELECT ON v TO PUBLIC
        Grant("Report Reader", "SELECT", True)  # ... TO "Report Reader" WITH GRANT OPTION
    """

    #: Role name, or ``"public"`` for ``PUBLIC``.
    grantee: str
    #: ``SELECT``, ``INSERT``, ... (see :data:`PRIVILEGES`).
    privilege: str
    grantable: bool = False


@dataclass(frozen=True)
class CreateView:
    """Create a declared view that the database does not have."""

    schema: str | None
    name: str
    #: The query as SQL text (compiled for PostgreSQL, parameters rendered as literals).
    definition: str
    with_data: bool
    comment: str | None
    #: Column names to write out, for SQL-text definitions (``None``: the query's own).
    columns: tuple[str, ...] | None
    #: Privileges to grant once created: those of the view this one re-creates, if any.
    grants: tuple[Grant, ...] = ()
    #: Owner to give it once created (``None``: whoever runs the migration).
    owner: str | None = None
    phase = "after"


@dataclass(frozen=True)
class DropView:
    """Drop a view that exists in the database and is not declared (any more)."""

    schema: str | None
    name: str
    #: ``pg_get_viewdef`` text, so that the drop can be reversed.
    definition: str
    with_data: bool
    comment: str | None
    indexes: tuple[ReflectedIndex, ...]
    #: Privileges and owner, so that the reverse (a create) restores them.
    grants: tuple[Grant, ...] = ()
    owner: str | None = None
    phase = "before"


@dataclass(frozen=True)
class CapturedView:
    """A view or materialized view as the catalog describes it: enough to create it again."""

    schema: str
    name: str
    #: ``pg_class.relkind``: ``'m'`` (materialized view) or ``'v'`` (view).
    kind: str
    #: ``pg_get_viewdef`` text, without the final semicolon.
    definition: str
    populated: bool
    comment: str | None
    #: ``reloptions`` of a plain view (``security_barrier=true``, ``check_option=local``).
    options: tuple[str, ...]
    #: ``pg_get_indexdef`` of each index: complete ``CREATE INDEX`` statements, naming the
    #: view without its schema when the ``search_path`` finds it.
    indexes: tuple[str, ...]
    #: ``pg_class.relacl`` without the owner's own privileges (re-created with the view).
    grants: tuple[Grant, ...] = ()
    #: The owning role; ``None`` when it is the role that captured the view, which owns
    #: whatever it creates again anyway.
    owner: str | None = None


@dataclass(frozen=True)
class ReplaceView:
    """Drop and re-create a view whose definition changed (its dependents are preserved).

    ``view`` and ``dependents`` say what the view and every view reading it looked like when
    the comparison ran, for a replace that cannot read the catalog (``--sql``): the view's
    ``indexes`` are those it still has when the replace runs (not those dropped before it).
    """

    schema: str | None
    name: str
    definition: str
    old_definition: str
    with_data: bool
    columns: tuple[str, ...] | None
    view: CapturedView | None = None
    #: Views and materialized views reading the view (directly or not), each after what it
    #: reads.
    dependents: tuple[CapturedView, ...] = ()
    #: How the declaration asks to replace it (``"drop_create"`` or ``"side_by_side"``);
    #: ``None`` leaves the choice to the caller.
    replace_strategy: str | None = None
    phase = "after"


@dataclass(frozen=True)
class CreateIndex:
    """Create a declared index on a view."""

    schema: str | None
    view_name: str
    index: sa.Index
    phase = "after"


@dataclass(frozen=True)
class DropIndex:
    """Drop an index of a view that is not declared (any more)."""

    schema: str | None
    view_name: str
    index: ReflectedIndex
    phase: str = "after"


@dataclass(frozen=True)
class ChangeComment:
    """Set (or remove, with ``None``) the comment of a view."""

    schema: str | None
    name: str
    comment: str | None
    old_comment: str | None
    phase = "after"


@dataclass(frozen=True)
class EnableTracking:
    """Install change tracking for a view declared with ``track_changes=True``."""

    schema: str | None
    name: str
    #: ``(schema, table)`` of every base table the view reads.
    sources: tuple[tuple[str | None, str], ...]
    phase = "after"


@dataclass(frozen=True)
class DisableTracking:
    """Remove the change tracking of a view that no longer asks for it (or is dropped)."""

    schema: str | None
    name: str
    sources: tuple[tuple[str | None, str], ...] | None
    phase: str = "after"


@dataclass(frozen=True)
class DetachView:
    """Drop a view (or a view depending on it) before table changes that it would block.

    It is re-created after those changes: by a :class:`CreateView` with the new definition
    for a changed view, by an :class:`AttachView` for a dependent.
    """

    #: ``None``: the default schema.
    schema: str | None
    name: str
    view: CapturedView
    phase = "before"


@dataclass(frozen=True)
class AttachView:
    """Re-create a dependent view dropped by a :class:`DetachView`, as it was."""

    schema: str | None
    name: str
    view: CapturedView
    phase = "after"


@dataclass(frozen=True)
class CreateIncremental:
    """Create an incremental view (its table, log, triggers, refresh function) and fill it.

    ``statements`` are the SQL the library runs for it, captured when the comparison ran;
    ``drop_statements`` remove it all again (the reverse).
    """

    schema: str | None
    name: str
    statements: tuple[str, ...]
    drop_statements: tuple[str, ...]
    phase = "after"


@dataclass(frozen=True)
class DropIncremental:
    """Drop an incremental view and everything it owns.

    ``create_statements`` re-create it as it is in the database (read from the catalog) and
    refill it: the reverse.
    """

    schema: str | None
    name: str
    statements: tuple[str, ...]
    create_statements: tuple[str, ...]
    phase = "before"


Change = (
    CreateView
    | DropView
    | ReplaceView
    | CreateIndex
    | DropIndex
    | ChangeComment
    | EnableTracking
    | DisableTracking
    | DetachView
    | AttachView
    | CreateIncremental
    | DropIncremental
)


@dataclass(frozen=True)
class ViewRef:
    """What an include filter is asked about: a declared or a reflected view."""

    schema: str | None
    name: str
    #: The declared ``Table`` of the view; ``None`` for a view found only in the database.
    table: sa.Table | None
    #: ``True`` when the view was found in the database.
    reflected: bool


#: ``include(ref) -> bool``: ``False`` leaves the view (and its indexes) alone.
IncludeFilter = Callable[[ViewRef], bool]
