"""Prometheus metrics for refreshes: what was refreshed, how long it took, and how stale views are.

Needs the ``metrics`` extra (``prometheus_client``)::

    pip install 'sqlalchemy-matview[metrics]'

:class:`RefreshMetrics` has two halves:

- counters and a histogram fed with :class:`~sqlalchemy_matview.RefreshResult`\\ s, as they
  happen: pass :meth:`RefreshMetrics.observe` as a worker's ``on_result`` (or call
  :meth:`RefreshMetrics.observe_all` with what ``refresh_views`` returned);
- gauges read from the change-tracking bookkeeping at scrape time (when it is given an
  ``engine``): how long each view has been stale, its pending changes and when it was last
  refreshed. A scrape that cannot reach the database still answers, with
  ``matview_scrape_error 1``, so an alert can tell "database down" from "view stale".

Metric names (prefix configurable with ``namespace=``):

=======================================  =========  =========================================
``matview_refresh_duration_seconds``     histogram  seconds per refresh, by ``view``, ``status``
``matview_refreshes_total``              counter    results by ``view`` and ``status``
``matview_refresh_failures_total``       counter    failed refreshes by ``view``
``matview_staleness_seconds``            gauge      age of the oldest unrefreshed change (0: fresh)
``matview_pending_changes``              gauge      unrefreshed change marks (capped, see below)
``matview_last_refresh_timestamp_seconds`` gauge    Unix time of the last refresh
``matview_scrape_error``                 gauge      1 when the last scrape's query failed
=======================================  =========  =========================================

``matview_pending_changes`` is the bookkeeping's count of change marks, which is at least 1
when a view is stale and is not a count of writing transactions (a writer adds a mark only
when it finds none): alert on staleness, not on this number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import MaterializedViewError
from .orchestration.results import RefreshResult

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.exposition import start_http_server
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sqlalchemy_matview.metrics needs prometheus_client: "
        "pip install 'sqlalchemy-matview[metrics]'"
    ) from exc

__all__ = ["DEFAULT_BUCKETS", "MetricsError", "RefreshMetrics", "serve_metrics"]

log = logging.getLogger("sqlalchemy_matview")

#: Histogram buckets in seconds: refreshes take from milliseconds to many minutes.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0,
)  # fmt: skip


class MetricsError(MaterializedViewError, ValueError):
    """:class:`RefreshMetrics` was given something it cannot use."""


class RefreshMetrics:
    """Prometheus metrics for the refreshes of one application.

    :param engine: a sync ``Engine`` on the database; with it, each scrape reads the views'
        staleness in one query (``None``: counters and histogram only).
    :param metadata: limit the gauges to the views declared on it (and read the bookkeeping
        from its tracking schema); ``None``: every view the bookkeeping knows.
    :param registry: where to register; ``None`` registers nowhere (use :meth:`collect`
        through your own registry, or pass a ``CollectorRegistry``).
    :param namespace: the metric name prefix.
    :param scrape_timeout: seconds a scrape's query may take before it counts as an error.

    Example (a worker feeding the metrics, scraped through a private registry)::

        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> from sqlalchemy_matview import RefreshResult
        >>> registry = CollectorRegistry()
        >>> metrics = RefreshMetrics(registry=registry)
        >>> metrics.observe(RefreshResult("public.daily", "refreshed", duration=0.4))
        >>> b'matview_refreshes_total{status="refreshed",view="public.daily"} 1.0' in (
        ...     generate_latest(registry)
        ... )
        True

    With a worker: ``RefreshWorker(engine, metadata, on_result=metrics.observe)``.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        metadata: sa.MetaData | None = None,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        namespace: str = "matview",
        buckets: Iterable[float] = DEFAULT_BUCKETS,
        scrape_timeout: float = 5.0,
    ) -> None:
        if isinstance(engine, AsyncEngine):
            raise MetricsError(
                "RefreshMetrics reads at scrape time, from the HTTP server's thread: pass a "
                "sync Engine (e.g. create_engine('postgresql+psycopg://...')), not an AsyncEngine"
            )
        if engine is not None and not isinstance(engine, Engine):
            raise MetricsError(f"engine must be a sqlalchemy Engine or None, not {engine!r}")
        if metadata is not None and not isinstance(metadata, sa.MetaData):
            raise MetricsError(f"metadata must be a sqlalchemy MetaData or None, not {metadata!r}")
        if not namespace or not namespace.replace("_", "a").isalnum():
            raise MetricsError(f"namespace must be letters, digits and '_', not {namespace!r}")
        if not scrape_timeout > 0:
            raise MetricsError(f"scrape_timeout must be a positive number, not {scrape_timeout!r}")
        self.engine = engine
        self.metadata = metadata
        self.namespace = namespace
        self.scrape_timeout = scrape_timeout
        # The counters live in a private registry; this object is the collector users register,
        # so that the event metrics and the scrape-time gauges come and go together.
        self._own = CollectorRegistry(auto_describe=True)
        self._duration = Histogram(
            "refresh_duration_seconds",
            "Seconds per refresh (lock wait and bookkeeping included).",
            ["view", "status"],
            namespace=namespace,
            buckets=tuple(buckets),
            registry=self._own,
        )
        self._results = Counter(
            "refreshes",
            "Refresh results by view and status (refreshed, skipped_*, failed).",
            ["view", "status"],
            namespace=namespace,
            registry=self._own,
        )
        self._failures = Counter(
            "refresh_failures",
            "Failed refreshes by view.",
            ["view"],
            namespace=namespace,
            registry=self._own,
        )
        if registry is not None:
            registry.register(self)

    # -- events -------------------------------------------------------------------------------

    def observe(self, result: RefreshResult) -> None:
        """Count one result; time it when a refresh ran (refreshed or failed).

        Fit for ``on_result=`` of both workers: it never raises for a result.
        """
        self._results.labels(result.view, result.status).inc()
        if result.status in ("refreshed", "failed"):
            self._duration.labels(result.view, result.status).observe(result.duration)
        if result.status == "failed":
            self._failures.labels(result.view).inc()

    def observe_all(self, results: Iterable[RefreshResult]) -> None:
        """:meth:`observe` each of ``results`` (what ``refresh_views`` and friends return)."""
        for result in results:
            self.observe(result)

    # -- the prometheus_client collector protocol ----------------------------------------------

    def describe(self) -> list[Metric]:
        # Without describe(), registering would call collect() and so query the database.
        return [*self._own.collect(), *self._gauges(None)]

    def collect(self) -> Iterator[Metric]:
        yield from self._own.collect()
        yield from self._gauges(self._states())

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def _states(self) -> list[tuple[str, Any, Any, Any]] | None:
        """``(view, ViewState or None, server time, DirtyBuckets or None)``, or ``None`` when
        reading failed. The dirty buckets are those of incremental views."""
        if self.engine is None:
            return []
        from .bookkeeping import tracking_schema
        from .catalog import installed_incremental
        from .orchestration.dirty import dirty_buckets
        from .orchestration.tracking import bookkeeping_inventory, view_states

        try:
            with self.engine.connect() as conn:
                # SET LOCAL: the setting ends with this read-only transaction.
                conn.execute(
                    sa.select(
                        sa.func.set_config(
                            "statement_timeout", f"{int(self.scrape_timeout * 1000)}", True
                        )
                    )
                )
                now = conn.scalar(sa.select(sa.func.now()))
                schema = tracking_schema(self.metadata)
                states = view_states(conn, schema)
                dirty = (
                    dirty_buckets(conn, installed_incremental(conn, schema), schema)
                    if bookkeeping_inventory(conn, schema).exists
                    else {}
                )
                conn.rollback()
                wanted = self._declared(conn.dialect.default_schema_name or "public")
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics: could not read the views' state: %s", exc.__class__.__name__)
            return None
        return [
            (f"{key[0]}.{key[1]}", states.get(key), now, dirty.get(key))
            for key in sorted(set(states) | set(dirty))
            if wanted is None or key in wanted
        ]

    def _declared(self, default: str) -> set[tuple[str, str]] | None:
        if self.metadata is None:
            return None
        from .schema import materialized_views

        return {(v.schema or default, v.name) for v in materialized_views(self.metadata)}

    def _gauges(self, states: list[tuple[str, Any, Any, Any]] | None) -> Iterator[Metric]:
        from .orchestration.dirty import staleness_bound

        staleness = GaugeMetricFamily(
            self._name("staleness_seconds"),
            "Age of the oldest change not yet refreshed (0 when fresh), tracked views; for "
            "incremental views, at most this (the time since the last refresh started).",
            labels=["view"],
        )
        pending = GaugeMetricFamily(
            self._name("pending_changes"),
            "Change marks not yet refreshed (at least 1 when stale), tracked views.",
            labels=["view"],
        )
        last = GaugeMetricFamily(
            self._name("last_refresh_timestamp_seconds"),
            "Unix time of the view's last refresh through this library.",
            labels=["view"],
        )
        dirty_buckets = GaugeMetricFamily(
            self._name("dirty_buckets"),
            "Buckets logged and not yet recomputed (counted up to 1000), incremental views.",
            labels=["view"],
        )
        for view, state, now, dirty in states or ():
            if dirty is not None:
                dirty_buckets.add_metric([view], float(dirty.count))
                bound = staleness_bound(
                    dirty,
                    state.last_refreshed_at if state else None,
                    state.last_duration if state else None,
                    now,
                )
                if bound is not None:
                    staleness.add_metric([view], bound.total_seconds())
            elif state.tracked:
                age = 0.0
                if state.stale and state.stale_since is not None:
                    age = max(0.0, (now - state.stale_since).total_seconds())
                staleness.add_metric([view], age)
                pending.add_metric([view], float(state.pending_changes))
            if state is not None and state.last_refreshed_at is not None:
                last.add_metric([view], state.last_refreshed_at.timestamp())
        yield from (staleness, pending, last, dirty_buckets)
        if self.engine is not None:
            error = GaugeMetricFamily(
                self._name("scrape_error"),
                "1 when the last scrape could not read the views' state from the database.",
            )
            error.add_metric([], 0.0 if states is not None else 1.0)
            yield error


def serve_metrics(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> tuple[Any, Any]:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    Returns ``(server, thread)``: ``server.server_port`` is the port (useful with ``port=0``),
    ``server.shutdown()`` stops it. A thin wrapper of ``prometheus_client.start_http_server``.
    """
    if not 0 <= port <= 65535:
        raise MetricsError(f"port must be between 0 and 65535, not {port}")
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread
