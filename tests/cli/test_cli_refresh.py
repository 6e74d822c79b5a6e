"""``matview refresh``: names, --all, --stale, --cascade, options, one line per result, exit."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview.cli import main


def _refresh(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["refresh", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def models(engine: sa.Engine, models_module: Callable[..., str]) -> ModuleType:
    module = importlib.import_module(models_module())
    module.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(module.events.insert(), [{"id": 1, "kind": "a"}, {"id": 2, "kind": "b"}])
    return module


def _total(engine: sa.Engine) -> object:
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT total FROM mv_total"))


def test_refresh_named_views_in_dependency_order(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    code, out = _refresh("mv_total", "public.mv_counts", "--url", url_text)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("✓ public.mv_counts  refreshed (concurrently) in ")
    assert lines[1].startswith("✓ public.mv_total  refreshed (plain) in ")
    assert _total(engine) == 2


def test_refresh_cascade_and_never_concurrently(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    code, out = _refresh("mv_counts", "--cascade", "--concurrently", "never", "--url", url_text)
    assert code == 0, out
    assert "public.mv_counts  refreshed (plain)" in out
    assert "public.mv_total  refreshed (plain)" in out
    assert _total(engine) == 2


def test_refresh_all_from_catalog_and_from_metadata(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    code, out = _refresh("--all", "--url", url_text)
    assert code == 0, out
    assert out.count("refreshed") == 2
    code, out = _refresh("--all", "--url", url_text, "--metadata", f"{models.__name__}:metadata")
    assert code == 0, out
    assert out.count("refreshed") == 2


def test_refresh_stale_only_refreshes_what_changed(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    md = f"{models.__name__}:metadata"
    code, out = _refresh("--stale", "--url", url_text, "--metadata", md)
    assert code == 0, out
    assert "public.mv_counts  refreshed" in out
    assert _total(engine) == 2
    code, out = _refresh("--stale", "--url", url_text, "--metadata", md)
    assert code == 0, out
    assert "refreshed (" not in out


def test_refresh_always_concurrently_fails_without_unique_index(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    # mv_total has no unique index: demanding CONCURRENTLY is refused, with one line.
    code, out = _refresh("mv_total", "--concurrently", "always", "--url", url_text)
    assert code == 1
    assert "Traceback" not in out
    assert "mv_total" in out


def test_failed_refresh_exits_non_zero(engine: sa.Engine, url_text: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (x int)"))
        conn.execute(sa.text("INSERT INTO src VALUES (1)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_div AS SELECT 1 / x AS y FROM src"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_ok AS SELECT 1 AS one"))
        # The data changes after creation, so only the refresh divides by zero.
        conn.execute(sa.text("UPDATE src SET x = 0"))
    code, out = _refresh("mv_div", "mv_ok", "--url", url_text)
    assert code == 1
    assert "✗ public.mv_div  FAILED: " in out and "division by zero" in out
    assert "✓ public.mv_ok  refreshed" in out
    assert "Error: 1 of 2 refresh(es) failed" in out


def test_lock_skip_reports_view_refreshed_elsewhere(
    engine: sa.Engine, url_text: str, models: ModuleType
) -> None:
    from sqlalchemy_matview import lock_key

    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(lock_key(models.mv_counts))))
        code, out = _refresh("mv_counts", "--url", url_text)
        assert code == 0, out
        assert "public.mv_counts  locked elsewhere, skipped" in out
        code, out = _refresh(
            "mv_counts", "--lock", "wait", "--lock-timeout", "0.2", "--url", url_text
        )
        assert code == 0, out
        assert "locked elsewhere, skipped" in out
        holder.execute(sa.select(sa.func.pg_advisory_unlock(lock_key(models.mv_counts))))
        holder.commit()
    code, out = _refresh("mv_counts", "--lock", "wait", "--url", url_text)
    assert code == 0 and "refreshed" in out


def test_lock_namespace_option_and_environment(
    engine: sa.Engine,
    url_text: str,
    models: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy_matview import lock_key

    salted = lock_key(models.mv_counts, namespace="blue")
    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(salted)))
        code, out = _refresh("mv_counts", "--url", url_text)  # default key: not held
        assert code == 0 and "public.mv_counts" in out and "locked" not in out, out
        code, out = _refresh("mv_counts", "--lock-namespace", "blue", "--url", url_text)
        assert code == 0 and "locked elsewhere, skipped" in out, out
        monkeypatch.setenv("MATVIEW_LOCK_NAMESPACE", "blue")
        code, out = _refresh("mv_counts", "--url", url_text)
        assert code == 0 and "locked elsewhere, skipped" in out, out
        holder.execute(sa.select(sa.func.pg_advisory_unlock(salted)))
        holder.commit()
