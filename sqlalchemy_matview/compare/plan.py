"""The order of operations: drops before what they read, creates after, views detached.

Pure functions over the dependency graph (``catalog.dependencies``) and the declared views;
the only database access is :meth:`Split.plan` capturing the views it detaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from .. import catalog
from .declared import Declared
from .records import AttachView, CapturedView, Change, DetachView, FullKey, Key
from .reflected import capture_views


@dataclass
class Split:
    """Changed views detached around table changes, and the views that depend on them."""

    #: The changed views (``None`` schema for the default one) that are detached.
    views: set[Key]
    #: Drops, readers before what they read.
    detach: list[DetachView]
    #: Dependents to re-create, in dependency order, each with what it reads among the
    #: detached views and dependents.
    pending: list[tuple[AttachView, set[Key]]]
    #: The changed views as they are in the database (their privileges go to the new ones).
    captured: dict[Key, CapturedView] = field(default_factory=dict)
    done: set[Key] = field(default_factory=set)

    @classmethod
    def plan(
        cls,
        conn: Connection,
        replaced: Sequence[Declared],
        rebuilt: Sequence[Declared],
        altered: set[Key],
        edges: Sequence[catalog.Dependency],
        dropped: set[Key],
        default_schema: str | None,
        blocking: Iterable[Key] = (),
    ) -> Split | None:
        def full(key: Key) -> FullKey:
            return (key[0] or default_schema or "public", key[1])

        def short(key: FullKey) -> Key:
            return (None if key[0] == default_schema else key[0], key[1])

        reads, readers = graphs(edges)
        altered_full = {full(k) for k in altered}

        views: set[FullKey] = {full(item.key) for item in rebuilt}
        views |= {full(key) for key in blocking}
        for item in replaced:
            key = full(item.key)
            now = reads.get(key, set()) | {full(t) for t in item.tables}
            if now & altered_full:
                views.add(key)
        if not views:
            return None
        # A changed view that reads a detached one (directly or through other views) is
        # detached too: re-created from its old definition, it might not fit the new one.
        for item in replaced:
            key = full(item.key)
            if key not in views and reachable(reads, key) & views:
                views.add(key)

        dependents: set[FullKey] = set()
        for key in views:
            dependents |= reachable(readers, key)
        dependents -= views
        dependents -= {full(k) for k in dropped}
        members = views | dependents
        captured = capture_views(conn, sorted(members))
        members &= set(captured)
        order = creation_order(members, reads)

        detach = [DetachView(*short(key), captured[key]) for key in reversed(order)]
        pending = [
            (
                AttachView(*short(key), captured[key]),
                {short(ref) for ref in reads.get(key, ()) if ref in members},
            )
            for key in order
            if key in dependents
        ]
        return cls(
            {short(k) for k in views},
            detach,
            pending,
            {short(k): captured[k] for k in views if k in captured},
        )

    def attach_ready(self, created: Key) -> list[AttachView]:
        """After ``created``: the dependents whose every detached source now exists."""
        self.done.add(created)
        ready: list[AttachView] = []
        progress = True
        while progress:
            progress = False
            for entry in list(self.pending):
                attach, needs = entry
                if needs <= self.done:
                    self.pending.remove(entry)
                    self.done.add((attach.schema, attach.name))
                    ready.append(attach)
                    progress = True
        return ready

    def attach_rest(self) -> list[AttachView]:
        rest = [attach for attach, _ in self.pending]
        self.pending.clear()
        return rest


def reachable(graph: dict[FullKey, set[FullKey]], start: FullKey) -> set[FullKey]:
    seen: set[FullKey] = set()
    stack = [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen and nxt != start:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def creation_order(members: set[FullKey], reads: dict[FullKey, set[FullKey]]) -> list[FullKey]:
    """``members``, each after every member it reads (directly or through others)."""
    ordered: list[FullKey] = []
    done: set[FullKey] = set()

    def visit(key: FullKey) -> None:
        if key in done:
            return
        done.add(key)
        for ref in sorted(reachable(reads, key) & members):
            visit(ref)
        ordered.append(key)

    for key in sorted(members):
        visit(key)
    return ordered


def graphs(
    edges: Sequence[catalog.Dependency],
) -> tuple[dict[FullKey, set[FullKey]], dict[FullKey, set[FullKey]]]:
    """``(reads, readers)``: what each view reads, and which views read each relation."""
    reads: dict[FullKey, set[FullKey]] = {}
    readers: dict[FullKey, set[FullKey]] = {}
    for edge in edges:
        reads.setdefault(edge.dependent, set()).add(edge.referenced)
        readers.setdefault(edge.referenced, set()).add(edge.dependent)
    return reads, readers


def dependents_in_order(edges: Sequence[catalog.Dependency], target: FullKey) -> list[FullKey]:
    """Every view reading ``target`` (directly or through others), each after what it reads."""
    reads, readers = graphs(edges)
    return creation_order(reachable(readers, target), reads)


def db_base_tables(
    edges: Sequence[catalog.Dependency],
    start: tuple[str, str],
    norm: Callable[[str | None], str | None],
) -> tuple[tuple[str | None, str], ...]:
    """What a view in the database reads, looking through materialized views to tables."""
    reads: dict[tuple[str, str], list[catalog.Dependency]] = {}
    for edge in edges:
        reads.setdefault(edge.dependent, []).append(edge)
    found: dict[tuple[str | None, str], None] = {}
    seen = {start}
    stack = [start]
    while stack:
        for edge in reads.get(stack.pop(), ()):
            ref = edge.referenced
            if edge.referenced_kind == "m":
                if ref not in seen:
                    seen.add(ref)
                    stack.append(ref)
            else:
                found[(norm(ref[0]), ref[1])] = None
    return tuple(sorted(found, key=lambda k: (k[0] or "", k[1])))


def readers_first(
    drops: Sequence[tuple[FullKey, list[Change]]],
    edges: Sequence[catalog.Dependency],
) -> list[tuple[FullKey, list[Change]]]:
    """``drops`` reordered so that each comes after every one that reads it (transitively).

    Stable: the given order is kept where the dependencies do not decide.
    """
    if len(drops) < 2:
        return list(drops)
    reads, _ = graphs(edges)
    keys = [key for key, _ in drops]
    members = set(keys)
    readers: dict[FullKey, list[FullKey]] = {key: [] for key in keys}
    for key in keys:
        for ref in reachable(reads, key) & members:
            readers[ref].append(key)
    by_key = dict(drops)
    ordered: list[tuple[FullKey, list[Change]]] = []
    done: set[FullKey] = set()

    def visit(key: FullKey) -> None:
        if key in done:
            return
        done.add(key)
        for reader in readers[key]:
            visit(reader)
        ordered.append((key, by_key[key]))

    for key in keys:
        visit(key)
    return ordered


def topological(items: Sequence[Declared]) -> list[Declared]:
    by_key = {item.key: item for item in items}
    ordered: list[Declared] = []
    state: dict[tuple[str | None, str], int] = {}

    def visit(item: Declared) -> None:
        mark = state.get(item.key)
        if mark == 2:
            return
        if mark == 1:
            from ..errors import DependencyCycleError

            raise DependencyCycleError(
                f"materialized view {item.name!r} depends on itself through other views; "
                "break the cycle in the definitions"
            )
        state[item.key] = 1
        for key in sorted(item.reads, key=lambda k: (k[0] or "", k[1])):
            if key in by_key:
                visit(by_key[key])
        state[item.key] = 2
        ordered.append(item)

    for item in items:
        visit(item)
    return ordered
