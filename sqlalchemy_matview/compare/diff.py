"""The comparison itself: :func:`compare_views`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import catalog
from ..bookkeeping import tracking_schema
from ..catalog import installed_incremental
from .declared import Declared, declared_views
from .incremental import compare_incremental
from .indexes import declared_shape
from .normalise import Probe, normalise, normalize_definition
from .plan import (
    Split,
    db_base_tables,
    dependents_in_order,
    graphs,
    reachable,
    readers_first,
    topological,
)
from .records import (
    Change,
    ChangeComment,
    CreateIndex,
    CreateView,
    DisableTracking,
    DropIndex,
    DropView,
    EnableTracking,
    FullKey,
    IncludeFilter,
    Key,
    ReflectedIndex,
    ReplaceView,
    ViewRef,
)
from .reflected import capture_views, column_readers, reflected_indexes, tracking_installed


def _named_indexes(table: sa.Table) -> dict[str, sa.Index]:
    return {str(i.name): i for i in sorted(table.indexes, key=lambda i: str(i.name)) if i.name}


def _as_printed(
    conn: Connection,
    declared: Sequence[Declared],
    existing: dict[Key, catalog.MaterializedViewInfo],
    indexes: dict[Key, dict[str, ReflectedIndex]],
) -> tuple[dict[int, str | None], dict[int, dict[str, str | None]]]:
    """The definitions of ``declared`` views that exist, and the shapes of their indexes that
    the database has under the same name, as PostgreSQL prints them (by ``id`` of the view).

    An index whose ``CREATE INDEX``, as SQLAlchemy writes it, is already what PostgreSQL
    prints needs no probe.
    """
    probes = []
    shapes_of: dict[int, dict[str, str | None]] = {}
    for d in declared:
        current = indexes.get(d.key, {})
        shapes = shapes_of[id(d)] = {}
        unsure = []
        for name, index in _named_indexes(d.table).items():
            if name not in current:
                continue
            shape = declared_shape(index)
            if shape is not None and shape == current[name].shape:
                shapes[name] = shape
            else:
                unsure.append(index)
        info = existing[d.key]
        probes.append(Probe(d.columns, d.sql, info.qualified_name, tuple(unsure)))
    definitions = {}
    for d, printed in zip(declared, normalise(conn, probes), strict=True):
        definitions[id(d)] = printed.definition
        shapes_of[id(d)].update(printed.index_shapes)
    return definitions, shapes_of


def _incremental_changes(
    conn: Connection,
    declared: Sequence[Declared],
    installed: Sequence[FullKey],
    incremental_keys: set[Key],
    unmanaged: set[Key],
    include: IncludeFilter | None,
    norm: Callable[[str | None], str | None],
    full: Callable[[Key], FullKey],
    bookkeeping: str,
    matviews: Iterable[FullKey],
) -> list[Change]:
    """Drops of incremental views no longer declared as such (before anything is created),
    then creates and rebuilds of the declared ones."""
    obsolete = [
        ((norm(s), n), (s, n))
        for s, n in installed
        if (norm(s), n) not in incremental_keys
        and (norm(s), n) not in unmanaged
        and (include is None or include(ViewRef(norm(s), n, None, True)))
    ]
    views = [(d.key, full(d.key), d.incremental) for d in declared if d.incremental is not None]
    drops, creates = compare_incremental(conn, views, installed, obsolete, bookkeeping, matviews)
    return [*drops, *creates]


def compare_views(
    conn: Connection,
    metadata: sa.MetaData | Sequence[sa.MetaData],
    *,
    schemas: Iterable[str | None] | None = None,
    include: IncludeFilter | None = None,
    altered_tables: Iterable[tuple[str | None, str]] = (),
    retyped_columns: Iterable[tuple[str | None, str, str]] = (),
    trusted_bookkeeping: bool = True,
) -> list[Change]:
    """What must change in the database for it to match the views declared in ``metadata``.

    :param conn: a PostgreSQL connection; it is used inside a savepoint that is rolled back,
        so nothing is left behind.
    :param metadata: one ``MetaData`` or several; every :class:`MaterializedView` on them is
        compared, and so are SQLAlchemy 2.1 ``CreateView(..., materialized=True)`` tables.
    :param schemas: schemas to compare, ``None`` standing for the default schema (default:
        only the default schema). Views elsewhere are neither created nor dropped.
    :param include: a filter; views for which it returns ``False`` are left alone.
    :param altered_tables: ``(schema, table)`` of the tables that the same migration changes
        in a way an existing view reading them would block: a dropped table, a dropped
        column, a column whose type changes. A changed view whose definition (old or new)
        reads one of them is detached instead of replaced (see the module docstring):
        :class:`DetachView` records come before those table changes, the :class:`CreateView`
        and :class:`AttachView` records after them.
    :param trusted_bookkeeping: whether the bookkeeping schema is owned by roles the caller
        trusts (``orchestration.tracking.bookkeeping_inventory(...).exists``); when not,
        incremental views in the database are not read from it (their objects would go into
        the migration as SQL).
    :param retyped_columns: ``(schema, table, column)`` of the columns whose type the same
        migration changes. A declared view that reads one (as ``pg_depend`` records it) is
        detached and created again even if its definition did not change.

    Views declared ``managed=False`` and views owned by an extension are never touched. The
    records come in execution order: drops of obsolete views first (dependents before what
    they read), then, view by view in dependency order, index drops, the create or replace,
    index creates, comment and change-tracking changes. The caller puts the records whose
    ``phase`` is ``"before"`` before its own table changes and the others after them.

    Example::

        from sqlalchemy_matview.compare import compare_views
        with engine.connect() as conn:
            for change in compare_views(conn, metadata):
                print(change)
    """
    metadatas = [metadata] if isinstance(metadata, sa.MetaData) else list(metadata)
    default_schema = conn.dialect.default_schema_name or catalog.current_schema(conn)
    wanted: set[str | None] = {None} if schemas is None else set(schemas)
    wanted = {None if s == default_schema else s for s in wanted}
    schema_names = sorted(s if s is not None else default_schema for s in wanted)

    def norm(schema: str | None) -> str | None:
        return None if schema == default_schema else schema

    def full(key: Key) -> FullKey:
        return (key[0] or default_schema or "public", key[1])

    declared_all, unmanaged = declared_views(metadatas, default_schema)
    included = [
        d
        for d in declared_all
        if d.schema in wanted
        and (include is None or include(ViewRef(d.schema, d.name, d.table, False)))
    ]
    # Incremental views are tables: compared by .incremental, not against pg_matviews.
    declared = [d for d in included if d.incremental is None]
    bookkeeping = tracking_schema(metadatas[0]) if metadatas else tracking_schema()
    installed_inc = (
        installed_incremental(conn, bookkeeping, schema_names) if trusted_bookkeeping else []
    )
    existing = {
        (norm(info.schema), info.name): info
        for info in catalog.materialized_views(conn, schema_names)
    }
    indexes = reflected_indexes(conn, schema_names, default_schema)
    tracked = tracking_installed(conn, tracking_schema(metadatas[0]) if metadatas else None)
    tracked_keys = {(norm(s), n) for s, n in tracked} if tracked is not None else set()

    declared_keys = {d.key for d in declared_all if d.incremental is None}
    obsolete = [
        info
        for key, info in existing.items()
        if key not in declared_keys
        and key not in unmanaged
        and not info.extension_owned
        and (include is None or include(ViewRef(key[0], key[1], None, True)))
    ]

    probe_of, shapes_of = _as_printed(
        conn, [d for d in declared if d.key in existing], existing, indexes
    )

    edges: list[catalog.Dependency] | None = None

    def dependency_edges() -> list[catalog.Dependency]:
        nonlocal edges
        if edges is None:
            edges = catalog.dependencies(conn)
        return edges

    if len(obsolete) > 1 or any((norm(i.schema), i.name) in tracked_keys for i in obsolete):
        dependency_edges()

    def changed(item: Declared) -> bool:
        found = existing.get(item.key)
        if found is None:
            return False
        return probe_of[id(item)] != normalize_definition(found.definition or "")

    split: Split | None = None
    altered = {(norm(s), t) for s, t in altered_tables}
    replaced = [d for d in declared if changed(d)]
    # A changed view that (in the database) still reads a view about to be dropped must be
    # dropped before it, and can only be created from its new definition after it: it is
    # detached like a view blocking a table change.
    blocking: set[Key] = set()
    if obsolete and replaced:
        graph, _ = graphs(dependency_edges())
        doomed = {info.qualified_name for info in obsolete}
        blocking = {d.key for d in replaced if reachable(graph, full(d.key)) & doomed}
    rebuilt: list[Declared] = []
    retyped = [(s or default_schema or "public", t, c) for s, t, c in retyped_columns]
    if retyped:
        readers = column_readers(conn, retyped)
        rebuilt = [
            d
            for d in declared
            if d.key in existing and (d.schema or default_schema, d.name) in readers
        ]
    if (altered and replaced) or rebuilt or blocking:
        split = Split.plan(
            conn,
            replaced,
            rebuilt,
            altered,
            dependency_edges(),
            {(norm(i.schema), i.name) for i in obsolete},
            default_schema,
            blocking,
        )

    # What re-creating views needs, in one query: the privileges and owners of the views to
    # drop (so that downgrades give them back), and each view to replace with every view that
    # reads it (so that the replace can re-create them without reading the catalog: --sql).
    replacing = [d for d in replaced if split is None or d.key not in split.views]
    dependents = {id(d): dependents_in_order(dependency_edges(), full(d.key)) for d in replacing}
    to_capture = [info.qualified_name for info in obsolete] + [full(d.key) for d in replacing]
    to_capture += [key for keys in dependents.values() for key in keys]
    access = capture_views(conn, list(dict.fromkeys(to_capture)))
    drops: list[tuple[FullKey, list[Change]]] = []
    for info in sorted(obsolete, key=lambda i: i.qualified_name):
        key = (norm(info.schema), info.name)
        view_indexes = tuple(indexes.get(key, {}).values())
        group: list[Change] = []
        if key in tracked_keys:
            sources = db_base_tables(edges or [], info.qualified_name, norm)
            group.append(DisableTracking(key[0], key[1], sources, phase="before"))
        group.extend(DropIndex(key[0], key[1], i, phase="before") for i in view_indexes)
        captured_view = access.get(info.qualified_name)
        group.append(
            DropView(
                schema=key[0],
                name=key[1],
                definition=normalize_definition(info.definition or ""),
                with_data=info.populated,
                comment=info.comment,
                indexes=view_indexes,
                grants=captured_view.grants if captured_view else (),
                owner=captured_view.owner if captured_view else None,
            )
        )
        drops.append((info.qualified_name, group))
    if split is not None:
        drops.extend((full((d.schema, d.name)), [d]) for d in split.detach)
    changes: list[Change] = [c for _, group in readers_first(drops, edges or []) for c in group]
    changes += _incremental_changes(
        conn,
        [d for d in included if d.incremental is not None],
        installed_inc,
        {d.key for d in declared_all if d.incremental is not None},
        unmanaged,
        include,
        norm,
        full,
        bookkeeping,
        [info.qualified_name for info in existing.values()],
    )

    for item in topological(declared):
        sql = item.sql
        columns = item.columns if item.text_definition else None
        found = existing.get(item.key)
        declared_indexes = _named_indexes(item.table)
        if split is not None and item.key in split.views:
            # Detached before the table changes: created anew, with every declared index,
            # the declared comment and the privileges it had; then the dependents that only
            # waited for it.
            old_view = split.captured.get(item.key)
            changes.append(
                CreateView(
                    item.schema,
                    item.name,
                    sql,
                    item.with_data,
                    item.comment,
                    columns,
                    grants=old_view.grants if old_view else (),
                    owner=old_view.owner if old_view else None,
                )
            )
            for name in sorted(declared_indexes):
                changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
            changes.extend(split.attach_ready(item.key))
        elif found is None:
            changes.append(
                CreateView(item.schema, item.name, sql, item.with_data, item.comment, columns)
            )
            for name in sorted(declared_indexes):
                changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
        else:
            current = indexes.get(item.key, {})
            stale = [
                current[name]
                for name in sorted(current)
                if name not in declared_indexes
                or shapes_of[id(item)].get(name) != current[name].shape
            ]
            changes.extend(DropIndex(item.schema, item.name, i) for i in stale)
            old = normalize_definition(found.definition or "")
            stale_names = {i.name for i in stale}
            if probe_of[id(item)] != old:
                captured = access.get(full(item.key))
                if captured is not None:
                    kept = tuple(
                        current[n].statement for n in sorted(current) if n not in stale_names
                    )
                    captured = dataclasses.replace(captured, indexes=kept)
                changes.append(
                    ReplaceView(
                        item.schema,
                        item.name,
                        sql,
                        old,
                        item.with_data,
                        columns,
                        view=captured,
                        dependents=tuple(
                            access[k] for k in dependents.get(id(item), ()) if k in access
                        ),
                        replace_strategy=item.replace_strategy,
                    )
                )
            for name in sorted(declared_indexes):
                if name not in current or name in stale_names:
                    changes.append(CreateIndex(item.schema, item.name, declared_indexes[name]))
            if (item.comment or None) != (found.comment or None):
                changes.append(ChangeComment(item.schema, item.name, item.comment, found.comment))
        if tracked is not None:
            if item.track_changes and item.key not in tracked_keys:
                changes.append(EnableTracking(item.schema, item.name, item.base_tables))
            elif not item.track_changes and item.key in tracked_keys:
                changes.append(DisableTracking(item.schema, item.name, item.base_tables))
    if split is not None:
        changes.extend(split.attach_rest())
    return changes
