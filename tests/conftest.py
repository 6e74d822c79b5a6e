"""Suite-wide test configuration.

The PostgreSQL fixtures (``pg_server``, ``pg_url``, ``engine``, ``async_engine``,
``pg_cron_server``) come from the ``sqlalchemy_matview.testing.plugin`` pytest
plugin, which the package registers as an entry point: do not list it in
``pytest_plugins``.  Put fixtures specific to one area in that folder's own
``conftest.py``.

Skips are loud: every run ends with the list of skipped tests and their reasons, and
``--fail-on-skip`` (what CI passes) turns any skip whose reason matches no
``--allow-skip REGEX`` into a failed run. A test that silently stops running (a missing
server package, a driver that no longer installs) then fails CI instead of hiding.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, settings

# Database round-trips make example timings noisy, and CI machines are slower.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("skips", "loud skips")
    group.addoption(
        "--fail-on-skip",
        action="store_true",
        help="fail the run when a test is skipped for a reason no --allow-skip matches",
    )
    group.addoption(
        "--allow-skip",
        action="append",
        default=[],
        metavar="REGEX",
        help="a skip reason (regular expression, searched) that --fail-on-skip tolerates",
    )


#: (node id, reason) of every test skipped in this run.
_SKIPS: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    _SKIPS.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        _SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


def _unexpected(config: pytest.Config) -> list[tuple[str, str]]:
    allowed = [re.compile(p) for p in config.getoption("--allow-skip")]
    return [(node, reason) for node, reason in _SKIPS if not any(p.search(reason) for p in allowed)]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    skips = _SKIPS
    terminalreporter.section("skipped tests", sep="-")
    if not skips:
        terminalreporter.write_line("none")
    for node, reason in skips:
        terminalreporter.write_line(f"SKIPPED {node}: {reason}")
    if config.getoption("--fail-on-skip"):
        unexpected = _unexpected(config)
        if unexpected:
            terminalreporter.write_line(
                f"--fail-on-skip: {len(unexpected)} test(s) skipped that this machine "
                "should run (allow a reason with --allow-skip REGEX):",
                red=True,
                bold=True,
            )
            for node, reason in unexpected:
                terminalreporter.write_line(f"  {node}: {reason}", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if config.getoption("--fail-on-skip") and _unexpected(config) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
