"""RefreshMetrics: counters from results, gauges from the bookkeeping, scraped over real HTTP."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from sqlalchemy_matview import RefreshResult, RefreshWorker, refresh_stale, refresh_views
from sqlalchemy_matview.metrics import MetricsError, RefreshMetrics, serve_metrics

from .conftest import Shop, wait_for


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition text, or None when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(f"{name}{{{wanted}}}" if labels else name) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


TOTALS = "public.mv_totals"
DURATIONS = "matview_refresh_duration_seconds_count"


def test_gauges_follow_a_change_and_a_refresh(engine, shop: Shop):
    registry = CollectorRegistry()
    metrics = RefreshMetrics(engine, shop.metadata, registry=registry)
    text = scrape(registry)
    assert sample(text, "matview_staleness_seconds", view=TOTALS) == 0.0
    assert sample(text, "matview_pending_changes", view=TOTALS) == 0.0
    assert sample(text, "matview_scrape_error") == 0.0

    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
    # The server's clock moves on: staleness grows while nothing refreshes.
    assert wait_for(
        lambda: (sample(scrape(registry), "matview_staleness_seconds", view=TOTALS) or 0) > 0
    )
    text = scrape(registry)
    assert (sample(text, "matview_pending_changes", view=TOTALS) or 0) >= 1

    metrics.observe_all(refresh_stale(engine, shop.metadata))
    text = scrape(registry)
    assert sample(text, "matview_staleness_seconds", view=TOTALS) == 0.0
    assert sample(text, "matview_pending_changes", view=TOTALS) == 0.0
    assert sample(text, "matview_refreshes_total", status="refreshed", view=TOTALS) == 1.0
    assert (
        sample(
            text,
            DURATIONS,
            status="refreshed",
            view=TOTALS,
        )
        == 1.0
    )
    assert (sample(text, "matview_last_refresh_timestamp_seconds", view=TOTALS) or 0) > (
        time.time() - 3600
    )


def test_failures_are_counted_and_timed(engine):
    md = sa.MetaData()
    from sqlalchemy_matview import MaterializedView

    src = sa.Table("divisors", md, sa.Column("d", sa.Integer))
    view = MaterializedView(
        "mv_ratio", md, sa.select((sa.literal(1) / src.c.d).label("r")), with_data=False
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"d": 0}])
    registry = CollectorRegistry()
    metrics = RefreshMetrics(registry=registry)
    results = refresh_views(engine, view)
    assert [r.status for r in results] == ["failed"]
    metrics.observe_all(results)
    text = scrape(registry)
    assert sample(text, "matview_refresh_failures_total", view="public.mv_ratio") == 1.0
    assert sample(text, "matview_refreshes_total", status="failed", view="public.mv_ratio") == 1.0
    assert sample(text, DURATIONS, status="failed", view="public.mv_ratio") == 1.0
    # No engine: no gauges read, and no scrape_error either.
    assert "matview_scrape_error" not in text


def test_a_scrape_answers_when_the_database_is_down(pg_url, shop: Shop):
    # Nothing listens on port 9 (discard) of this host: the connection is refused at once.
    down = sa.create_engine(pg_url.set(port=9), connect_args={"connect_timeout": 2})
    registry = CollectorRegistry()
    metrics = RefreshMetrics(down, shop.metadata, registry=registry)
    metrics.observe(RefreshResult("public.mv_totals", "skipped_fresh"))
    text = scrape(registry)
    assert sample(text, "matview_scrape_error") == 1.0
    assert sample(text, "matview_refreshes_total", status="skipped_fresh", view=TOTALS)
    down.dispose()


def test_served_over_http_while_a_worker_refreshes(engine, shop: Shop):
    registry = CollectorRegistry()
    metrics = RefreshMetrics(engine, shop.metadata, registry=registry)
    server, _thread = serve_metrics(0, "127.0.0.1", registry)
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def http() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            return str(response.read().decode())

    worker = RefreshWorker(engine, shop.metadata, debounce=0.1, on_result=metrics.observe)
    worker.start()
    try:
        assert wait_for(lambda: worker.passes >= 1)
        with engine.begin() as conn:
            conn.execute(shop.orders.insert(), [{"customer": 2, "amount": 500}])
        assert wait_for(
            lambda: (
                (
                    sample(
                        http(), "matview_refreshes_total", status="refreshed", view="public.mv_top"
                    )
                    or 0
                )
                >= 1
            )
        )
        text = http()
        assert sample(text, "matview_staleness_seconds", view=TOTALS) == 0.0
        assert sample(text, "matview_scrape_error") == 0.0
    finally:
        assert worker.stop(timeout=30)
        server.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": "bad-name"}, "namespace"),
        ({"scrape_timeout": 0}, "scrape_timeout"),
        ({"metadata": "md"}, "metadata"),
        ({"engine": "postgresql://"}, "engine"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(MetricsError, match=message):
        RefreshMetrics(registry=None, **kwargs)


def test_an_async_engine_is_refused(pg_url):
    from sqlalchemy.ext.asyncio import create_async_engine

    async_engine = create_async_engine(pg_url.set(drivername="postgresql+psycopg"))
    with pytest.raises(MetricsError, match="sync Engine"):
        RefreshMetrics(async_engine, registry=None)


def test_registered_on_a_registry_without_querying(pg_url, shop: Shop):
    # describe() keeps registration from running a scrape (which would need the database).
    down = sa.create_engine(pg_url.set(port=9))
    registry = CollectorRegistry()
    RefreshMetrics(down, shop.metadata, registry=registry)
    names = set(registry._names_to_collectors)  # what registration recorded
    assert "matview_staleness_seconds" in names
    assert "matview_refreshes_total" in names
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RefreshMetrics(down, shop.metadata, registry=registry)
