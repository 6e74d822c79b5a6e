"""How old each view's data is, against its freshness objective (``max_staleness``).

:func:`freshness` answers the operator's question "how old is what my users see?" for every
view declared on a ``MetaData``, in three read-only queries (the catalog, the bookkeeping,
the server's clock), none of which scans the change log or waits behind a refresh: it
works on a hot standby too.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .. import catalog
from ..bookkeeping import tracking_schema
from ..schema import MaterializedView, materialized_views
from .dirty import dirty_buckets, staleness_bound
from .tracking import view_states

__all__ = [
    "Freshness",
    "due_views",
    "freshness",
    "periodic_interval",
    "periodic_views",
    "tracked_cap",
]

#: Part of an objective a worker leaves for the refresh itself: it starts a refresh when half
#: of ``max_staleness`` has passed, so that a refresh taking up to the other half still lands
#: within the objective.
HEADROOM = 0.5


@dataclass(frozen=True)
class Freshness:
    """One view's freshness, as :func:`freshness` reports it."""

    #: ``schema.name`` of the view.
    view: str
    #: Whether change tracking marks it stale (``track_changes=True`` and installed).
    tracked: bool
    #: False when the view exists ``WITH NO DATA`` (reading it fails) or does not exist.
    populated: bool
    #: When the view was last refreshed through this library (``None``: never, as far as the
    #: bookkeeping knows: created by ``create_all`` and not refreshed since, or refreshed
    #: with a bare ``REFRESH``).
    last_refreshed_at: datetime.datetime | None
    #: When its oldest change not yet refreshed was made (tracked views; ``None``: fresh).
    stale_since: datetime.datetime | None
    #: Age of the oldest unrefreshed change for a tracked view (zero when fresh); for an
    #: untracked view, time since its last refresh; ``None`` when unknown.
    staleness: datetime.timedelta | None
    #: The declared objective (``MaterializedView(max_staleness=...)``), or ``None``.
    max_staleness: datetime.timedelta | None
    #: An incremental view's dirty buckets (up to :data:`~.dirty.DIRTY_CAP`); ``None`` for
    #: other views. Its ``staleness`` is then a bound: the time since its last refresh
    #: started when anything is dirty (see :func:`~.dirty.staleness_bound`).
    dirty_buckets: int | None = None

    @property
    def breached(self) -> bool:
        """True when the view has an objective and is (or may be) older than it.

        An unknown age counts as a breach: an untracked view with an objective that nothing
        has refreshed through this library cannot be shown to meet it.
        """
        if self.max_staleness is None:
            return False
        return self.staleness is None or self.staleness > self.max_staleness


def _report(conn: Connection, metadata: sa.MetaData) -> list[Freshness]:
    current = catalog.current_schema(conn)
    now = conn.scalar(sa.select(sa.func.now()))
    assert isinstance(now, datetime.datetime)
    views = materialized_views(metadata, managed=None)
    schemas = sorted({v.schema or current for v in views})
    populated = {
        (info.schema, info.name): info.populated
        for info in catalog.materialized_views(conn, schemas, definitions=False)
    }
    states = view_states(conn, tracking_schema(metadata))
    incremental = dirty_buckets(
        conn,
        [(v.schema or current, v.name) for v in views if v.incremental is not None],
        tracking_schema(metadata),
    )
    out: list[Freshness] = []
    for view in views:
        key = (view.schema or current, view.name)
        state = states.get(key)
        dirty = incremental.get(key)
        if dirty is not None:
            out.append(
                Freshness(
                    view=f"{key[0]}.{key[1]}",
                    tracked=True,
                    populated=True,
                    last_refreshed_at=state.last_refreshed_at if state else None,
                    stale_since=None,
                    staleness=staleness_bound(
                        dirty,
                        state.last_refreshed_at if state else None,
                        state.last_duration if state else None,
                        now,
                    ),
                    max_staleness=view.max_staleness,
                    dirty_buckets=dirty.count,
                )
            )
            continue
        tracked = bool(state and state.tracked)
        last = state.last_refreshed_at if state else None
        stale_since = state.stale_since if state and state.stale else None
        staleness: datetime.timedelta | None
        if tracked:
            zero = datetime.timedelta(0)
            staleness = max(now - stale_since, zero) if stale_since else zero
        else:
            staleness = max(now - last, datetime.timedelta(0)) if last else None
        out.append(
            Freshness(
                view=f"{key[0]}.{key[1]}",
                tracked=tracked,
                populated=populated.get(key, False),
                last_refreshed_at=last,
                stale_since=stale_since,
                staleness=staleness,
                max_staleness=view.max_staleness,
            )
        )
    return out


def freshness(bind: Engine | Connection | Session, metadata: sa.MetaData) -> list[Freshness]:
    """The freshness of every view declared on ``metadata``, in declaration order.

    Read-only (fine on a hot standby) and cheap: it never scans the change log and never
    waits behind a running ``REFRESH``. The async twin is
    :func:`sqlalchemy_matview.asyncio.freshness`.

    Example::

        for f in freshness(engine, metadata):
            if f.breached:
                print(f"{f.view} is {f.staleness} old; objective {f.max_staleness}")
    """
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return _report(conn, metadata)
    if isinstance(bind, Session):
        return _report(bind.connection(), metadata)
    if isinstance(bind, Connection):
        return _report(bind, metadata)
    raise TypeError(
        "freshness takes an Engine, a Connection or a Session "
        f"(for async binds use sqlalchemy_matview.asyncio.freshness), not {bind!r}"
    )


# -- what the workers need ------------------------------------------------------------------


def _objective(views: list[MaterializedView]) -> float | None:
    seconds = [v.max_staleness.total_seconds() for v in views if v.max_staleness is not None]
    return min(seconds) * HEADROOM if seconds else None


def tracked_cap(metadata: sa.MetaData) -> float | None:
    """The longest a worker may hold back a change (seconds): ``HEADROOM`` of the smallest
    objective of a tracked view, or ``None`` when no tracked view has one."""
    return _objective([v for v in materialized_views(metadata, managed=True) if v.track_changes])


def periodic_views(metadata: sa.MetaData) -> list[MaterializedView]:
    """Views nothing marks stale that have an objective: a worker refreshes them on a period."""
    return [
        v
        for v in materialized_views(metadata, managed=True)
        if not v.track_changes and v.max_staleness is not None
    ]


def periodic_interval(metadata: sa.MetaData) -> float | None:
    """How often (seconds) a worker must look at :func:`periodic_views`, or ``None``."""
    return _objective(periodic_views(metadata))


def due_views(conn: Connection, metadata: sa.MetaData) -> list[MaterializedView]:
    """The :func:`periodic_views` due for a refresh: older than ``HEADROOM`` of their
    objective, or of unknown age. Read from the bookkeeping, so that several workers share
    one clock (a view another worker just refreshed is not due)."""
    views = periodic_views(metadata)
    if not views:
        return []
    ages = {f.view: f.staleness for f in _report(conn, metadata)}
    current = catalog.current_schema(conn)
    due = []
    for view in views:
        assert view.max_staleness is not None
        age = ages.get(f"{view.schema or current}.{view.name}")
        if age is None or age >= view.max_staleness * HEADROOM:
            due.append(view)
    return due
