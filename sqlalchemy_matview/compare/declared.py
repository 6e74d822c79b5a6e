"""The declared side: the managed views of one or more ``MetaData`` and what they read."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement, TextClause

from ..query import definition_sql
from ..schema import INFO_KEY, MaterializedView, materialized_views


@dataclass
class Declared:
    schema: str | None
    name: str
    definition: ClauseElement
    #: The definition as SQL for PostgreSQL (see :func:`~sqlalchemy_matview.query.definition_sql`).
    sql: str
    columns: tuple[str, ...]
    text_definition: bool
    with_data: bool
    comment: str | None
    table: sa.Table
    track_changes: bool = False
    #: ``MaterializedView(replace_strategy=...)``; ``None`` leaves it to the caller.
    replace_strategy: str | None = None
    reads: set[tuple[str | None, str]] = field(default_factory=set)
    #: Tables (not views) that the declared definition reads directly.
    tables: set[tuple[str | None, str]] = field(default_factory=set)
    base_tables: tuple[tuple[str | None, str], ...] = ()
    #: The declared view when it is incremental (a table with triggers, not a matview).
    incremental: MaterializedView | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.schema, self.name)


def _native_view(table: sa.Table) -> Any:
    # SQLAlchemy 2.1's CreateView(materialized=True) leaves its construct on the Table.
    creator = getattr(table, "_creator_ddl", None)
    if getattr(table, "is_view", False) and getattr(creator, "materialized", False):
        return creator
    return None


def is_view_table(table: sa.Table) -> bool:
    """True for a ``Table`` that stands for a view (ours, or SQLAlchemy 2.1's native)."""
    return INFO_KEY in table.info or bool(getattr(table, "is_view", False))


def declared_views(
    metadatas: Sequence[sa.MetaData], default_schema: str | None
) -> tuple[list[Declared], set[tuple[str | None, str]]]:
    """Managed views to compare, and the keys of unmanaged ones (never to be touched)."""

    def norm(schema: str | None) -> str | None:
        return None if schema == default_schema else schema

    declared: list[Declared] = []
    unmanaged: set[tuple[str | None, str]] = set()
    by_table: dict[int, Declared] = {}
    views: list[MaterializedView] = []
    for metadata in metadatas:
        for view in materialized_views(metadata):
            if not view.managed:
                unmanaged.add((norm(view.schema), view.name))
                continue
            views.append(view)
            item = Declared(
                schema=norm(view.schema),
                name=view.name,
                definition=view.definition,
                sql=view.sql,
                columns=tuple(c.name for c in view.table.c),
                text_definition=isinstance(view.definition, TextClause),
                with_data=view.with_data,
                comment=view.comment,
                table=view.table,
                track_changes=view.track_changes,
                replace_strategy=view.replace_strategy,
                incremental=view if view.incremental is not None else None,
            )
            declared.append(item)
            by_table[id(view.table)] = item
        for table in metadata.tables.values():
            native = _native_view(table)
            if native is None or id(table) in by_table:
                continue
            item = Declared(
                schema=norm(table.schema),
                name=table.name,
                definition=native.selectable,
                sql=definition_sql(native.selectable),
                columns=tuple(c.name for c in table.c),
                text_definition=isinstance(native.selectable, TextClause),
                with_data=True,
                comment=table.comment,
                table=table,
            )
            declared.append(item)
            by_table[id(table)] = item

    for item in declared:
        owner = item.table.info.get(INFO_KEY)
        sources: Iterable[sa.Table]
        if isinstance(owner, MaterializedView):
            sources = owner.sources
        else:
            sources = [e for e in visitors.iterate(item.definition) if isinstance(e, sa.Table)]
        for source in sources:
            if source is item.table:
                continue
            if id(source) in by_table:
                item.reads.add(by_table[id(source)].key)
            elif not is_view_table(source):
                item.tables.add((norm(source.schema), source.name))
    for item in declared:
        item.base_tables = tuple(_base_tables(item, by_table, norm))
    return declared, unmanaged


def _base_tables(
    item: Declared,
    by_table: dict[int, Declared],
    norm: Callable[[str | None], str | None],
) -> Iterator[tuple[str | None, str]]:
    # Change tracking puts triggers on tables; a view read by this view contributes its own
    # tables instead (PostgreSQL has no triggers on materialized views).
    seen: set[int] = set()
    stack = [item.table]
    found: dict[tuple[str | None, str], None] = {}
    while stack:
        table = stack.pop()
        view = table.info.get(INFO_KEY)
        sources = view.sources if isinstance(view, MaterializedView) else ()
        for source in sources:
            if id(source) in seen or source is table:
                continue
            seen.add(id(source))
            if id(source) in by_table or INFO_KEY in source.info:
                stack.append(source)
            else:
                found[(norm(source.schema), source.name)] = None
    return iter(found)
