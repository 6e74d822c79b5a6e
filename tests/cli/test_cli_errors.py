"""Bad input ends with one line and a non-zero exit status, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sqlalchemy_matview.cli import connect_url, main


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.output


def _one_error_line(out: str) -> str:
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+psycopg://u:p@h:5433/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_connect_url_normalises_drivers(raw: str, expected: str) -> None:
    assert connect_url(raw).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "malformed database URL"),
        ("postgresql://user:secret@host:notaport/db", "malformed database URL"),
        ("sqlite:///app.db", "PostgreSQL only"),
        ("postgresql://user@localhost", "names no database"),
    ],
)
def test_malformed_urls(url: str, message: str) -> None:
    code, out = _run("status", "--url", url)
    assert code == 1
    line = _one_error_line(out)
    assert message in line
    assert "secret" not in out


def test_missing_url_is_a_usage_error() -> None:
    code, out = _run("status", env={"DATABASE_URL": ""})
    assert code == 2
    assert "pass --url or set $DATABASE_URL" in out


def test_database_url_environment_variable(url_text: str) -> None:
    code, out = _run("status", "--json", env={"DATABASE_URL": url_text})
    assert (code, out.strip()) == (0, "[]")


def test_unreachable_server() -> None:
    code, out = _run("status", "--url", "postgresql://postgres:pw@127.0.0.1:1/nowhere")
    assert code == 1
    line = _one_error_line(out)
    assert line.startswith("Error: cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon_here", "must be module:attribute"),
        ("surely_not_a_module_xyz:metadata", "cannot import 'surely_not_a_module_xyz'"),
        ("json:nothing_here", "has no attribute 'nothing_here'"),
        ("json:dumps", "is a function, not a sqlalchemy MetaData"),
    ],
)
def test_bad_metadata_path(url_text: str, path: str, message: str) -> None:
    code, out = _run("status", "--url", url_text, "--metadata", path)
    assert code == 1
    assert message in _one_error_line(out)


def test_metadata_module_that_raises(url_text: str, models_module: Callable[..., str]) -> None:
    name = models_module("raise RuntimeError('models are broken')\n")
    code, out = _run("status", "--url", url_text, "--metadata", f"{name}:metadata")
    assert code == 1
    assert "RuntimeError: models are broken" in _one_error_line(out)


def test_declarative_base_is_accepted(url_text: str, models_module: Callable[..., str]) -> None:
    name = models_module(
        "from sqlalchemy.orm import DeclarativeBase\nclass Base(DeclarativeBase):\n    pass\n"
    )
    code, out = _run("status", "--url", url_text, "--metadata", f"{name}:Base", "--json")
    assert (code, out.strip()) == (0, "[]")


def test_unknown_view_lists_known_ones(engine: sa.Engine, url_text: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_a AS SELECT 1 AS x"))
        conn.execute(sa.text("CREATE SCHEMA s"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW s.mv_b AS SELECT 1 AS x"))
    code, out = _run("refresh", "mv_nope", "--url", url_text)
    assert code == 1
    line = _one_error_line(out)
    assert "unknown materialized view 'mv_nope'" in line
    assert "public.mv_a, s.mv_b" in line
    code, out = _run("refresh", "public.mv_b", "--url", url_text)
    assert code == 1 and "unknown materialized view 'public.mv_b'" in out


def test_refresh_needs_a_choice(url_text: str) -> None:
    code, out = _run("refresh", "--url", url_text)
    assert code == 2 and "exactly one of --all / --stale" in out
    code, out = _run("refresh", "--all", "--stale", "--url", url_text)
    assert code == 2
    code, out = _run("refresh", "--stale", "--url", url_text)
    assert code == 2 and "--stale needs --metadata" in out


def test_watch_needs_metadata(url_text: str) -> None:
    code, out = _run("watch", "--url", url_text)
    assert code == 2 and "watch needs --metadata" in out


def test_real_process_reports_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_matview.cli", "status", "--url", "mysql://x@y/z"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: matview works with PostgreSQL only, and 'mysql://x@y/z' is a 'mysql' URL"
    ]
