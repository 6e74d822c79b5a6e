#!/usr/bin/env python3
"""Mutation spot-check: apply deliberate breaks one at a time and see which the tests catch.

Run it before a release (not in CI: it takes several minutes), from the repository root,
with the test venv's Python::

    .venv/bin/python scripts/mutation_spotcheck.py            # every break, its own tests
    .venv/bin/python scripts/mutation_spotcheck.py --full     # every break, whole default run
    .venv/bin/python scripts/mutation_spotcheck.py --only lock-key-hash --only index-unique
    .venv/bin/python scripts/mutation_spotcheck.py --list

Each break is a textual replacement in one source file. The files git knows (tracked, or
new and not ignored) are copied into
a temporary directory, the break is applied to the copy, and ``pytest -m "not slow"`` runs
there on the tests listed for that break (``--full``: the whole default run), with the copy
first on ``PYTHONPATH`` so that the tests (and the ``matview`` processes they start) import
the broken package. The working tree is never modified.

A break is *killed* when pytest fails, *survived* when it passes: a survivor is a behaviour
no test pins down; write the test. *n/a* means the text to replace is no longer in the file
(the code moved on): update the break in ``BREAKS``. The exit status is 1 when any break
survived or was n/a, so the script can gate a release checklist.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    """One deliberate bug: replace ``old`` (which must occur exactly once) by ``new``."""

    id: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


W = "tests/orchestration/test_orch_worker.py"
AW = "tests/orchestration/test_orch_async_worker.py"
RACES = "tests/orchestration/test_orch_races.py"
CONTRACTS = "tests/orchestration/test_orch_contracts.py"
REFRESH = "tests/orchestration/test_orch_refresh.py"
INDEXES = "tests/alembic_ext/test_alembic_index_changes.py"
ORM = "tests/core/test_core_orm.py"

BREAKS: tuple[Break, ...] = (
    Break(
        "index-unique",
        "index comparison ignores the unique flag",
        "sqlalchemy_matview/compare.py",
        "    if bool(declared.unique) != reflected.unique:\n        return False\n",
        "    if False:\n        return False\n",
        (INDEXES,),
    ),
    Break(
        "index-columns",
        "index comparison ignores which columns are indexed",
        "sqlalchemy_matview/compare.py",
        '        if declared_column and getattr(expr, "name", None) != element:\n',
        "        if False:\n",
        (INDEXES,),
    ),
    Break(
        "index-column-count",
        "index comparison ignores how many columns are indexed",
        "sqlalchemy_matview/compare.py",
        "    if len(expressions) != len(reflected.elements):\n        return False\n",
        "    if len(expressions) != len(reflected.elements):\n"
        "        expressions = expressions[: len(reflected.elements)]\n",
        (INDEXES,),
    ),
    Break(
        "worker-catch-up-once",
        "the thread worker's catch-up pass runs on the first connect only",
        "sqlalchemy_matview/orchestration/worker.py",
        '                self._pass("catch-up")\n',
        '                if self.connections == 1:\n                    self._pass("catch-up")\n',
        (W,),
    ),
    Break(
        "async-worker-catch-up-once",
        "the asyncio worker's catch-up pass runs on the first connect only",
        "sqlalchemy_matview/orchestration/async_worker.py",
        '                    await self._pass("catch-up")\n',
        "                    if self.connections == 1:\n"
        '                        await self._pass("catch-up")\n',
        (AW,),
    ),
    Break(
        "lock-key-hash",
        "lock_key hashes differently (other bytes of the digest)",
        "sqlalchemy_matview/orchestration/locking.py",
        'int.from_bytes(digest[:8], "big", signed=True)',
        'int.from_bytes(digest[1:9], "big", signed=True)',
        (CONTRACTS,),
    ),
    Break(
        "flush-before-refresh",
        "a Session does not flush pending objects before refresh() runs",
        "sqlalchemy_matview/readonly.py",
        "    if session.new or session.dirty or session.deleted:\n        session.flush()\n",
        "    if session.new or session.dirty or session.deleted:\n        pass\n",
        (ORM,),
    ),
    Break(
        "session-bind-flush",
        "refresh_views(session, ...) does not flush the session first",
        "sqlalchemy_matview/orchestration/runner.py",
        "        bind.flush()  # the refresh must see the session's pending changes\n",
        "        pass\n",
        (REFRESH,),
    ),
    Break(
        "stale-recheck",
        "refresh_stale does not re-check staleness under the view's lock",
        "sqlalchemy_matview/orchestration/tracking.py",
        "    IF only_if_stale AND NOT EXISTS (",
        "    IF false AND NOT EXISTS (",
        (RACES,),
    ),
    Break(
        "snapshot-clearing",
        "a refresh clears changes committed while it ran (lost change)",
        "sqlalchemy_matview/orchestration/tracking.py",
        "(pg_catalog.pg_visible_in_snapshot(c.txid::text::xid8, view_snapshot)",
        "(true",
        (RACES,),
    ),
    Break(
        "skip-lock-ignored",
        "lock='skip' refreshes even while another process holds the view's lock",
        "sqlalchemy_matview/orchestration/tracking.py",
        "IF NOT pg_catalog.pg_try_advisory_xact_lock(lock_key) THEN",
        "IF false THEN",
        (REFRESH,),
    ),
    Break(
        "job-command-key",
        "the pg_cron job command passes a wrong lock key",
        "sqlalchemy_matview/orchestration/tracking.py",
        "            sa.literal(lock_key((schema, name)), sa.BigInteger),\n",
        "            sa.literal(lock_key((schema, name)) + 1, sa.BigInteger),\n",
        (CONTRACTS,),
    ),
    Break(
        "worker-whitelist",
        "the thread worker refreshes on any payload, not only declared views",
        "sqlalchemy_matview/orchestration/worker.py",
        "                if self._whitelist.accept(notify.payload):\n",
        "                if self._whitelist.accept(notify.payload) or True:\n",
        (W,),
    ),
    Break(
        "async-worker-whitelist",
        "the asyncio worker refreshes on any payload, not only declared views",
        "sqlalchemy_matview/orchestration/async_worker.py",
        "                    if self._whitelist.accept(item):\n",
        "                    if self._whitelist.accept(item) or True:\n",
        (AW,),
    ),
    Break(
        "max-delay",
        "max_delay no longer bounds a stream of changes",
        "sqlalchemy_matview/orchestration/schedule.py",
        " or now >= self._first + self.max_delay)",
        " or now >= self._first + 100 * self.max_delay)",
        ("tests/orchestration/test_orch_schedule.py", W, AW),
    ),
    Break(
        "concurrently-auto",
        "concurrently='auto' ignores whether the view has a unique index",
        "sqlalchemy_matview/orchestration/runner.py",
        "    possible = item.populated and item.concurrent_index\n",
        "    possible = item.populated\n",
        (REFRESH,),
    ),
    Break(
        "dependents-of-failed",
        "views reading a failed view are refreshed anyway",
        "sqlalchemy_matview/orchestration/runner.py",
        'status.get(u) in ("failed", "skipped_dependency_failed")',
        'status.get(u) in ("skipped_dependency_failed",)',
        (REFRESH,),
    ),
    Break(
        "orm-writes-to-view",
        "ORM inserts/updates/deletes of a mapped view are no longer refused",
        "sqlalchemy_matview/readonly.py",
        "                continue\n            raise _refuse(view, verb)\n",
        "                continue\n            pass\n",
        (ORM,),
    ),
)


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("COVERAGE_PROCESS_START", None)
    env.pop("COVERAGE_PROCESS_CONFIG", None)
    return env


def _check_imports_copy(copy: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import sqlalchemy_matview; print(sqlalchemy_matview.__file__)"],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"the copy is not imported first (got {found}); is PYTHONPATH honoured?")


def _pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """Run pytest in the copy: (outcome, seconds, last lines of output)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        *tests,
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    took = time.monotonic() - started
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    outcome = {0: "passed", 1: "failed", 5: "no tests"}.get(done.returncode, "error")
    return outcome, took, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="break id (repeatable)")
    parser.add_argument("--full", action="store_true", help='run all of -m "not slow" each time')
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbroken run")
    args = parser.parse_args(argv)

    breaks = [b for b in BREAKS if not args.only or b.id in args.only]
    unknown = set(args.only) - {b.id for b in BREAKS}
    if unknown:
        parser.error(f"unknown break(s): {', '.join(sorted(unknown))}")
    if args.list:
        for b in BREAKS:
            print(f"{b.id:28} {b.path}: {b.what}")
        return 0

    with tempfile.TemporaryDirectory(prefix="matview-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_tree(copy)
        _check_imports_copy(copy)
        if not args.no_baseline:
            tests = () if args.full else tuple(sorted({t for b in breaks for t in b.tests}))
            outcome, took, tail = _pytest(copy, tests, args.timeout)
            print(f"baseline (no break): {outcome} in {took:.0f}s", flush=True)
            if outcome != "passed":
                print(tail)
                print("the unbroken code must pass first; results would mean nothing")
                return 2
        rows: list[tuple[str, str, float]] = []
        for b in breaks:
            target = copy / b.path
            original = target.read_text()
            count = original.count(b.old)
            if count != 1:
                verdict = "n/a" if count == 0 else f"n/a ({count} matches)"
                rows.append((b.id, verdict, 0.0))
                print(f"{b.id:28} {verdict}", flush=True)
                continue
            target.write_text(original.replace(b.old, b.new))
            try:
                outcome, took, tail = _pytest(copy, () if args.full else b.tests, args.timeout)
            finally:
                target.write_text(original)
            verdict = {
                "failed": "killed",
                "error": "killed (error)",
                "timeout": "killed (timeout)",
                "passed": "SURVIVED",
                "no tests": "n/a (no tests ran)",
            }[outcome]
            rows.append((b.id, verdict, took))
            print(f"{b.id:28} {verdict:18} {took:5.0f}s  {b.what}", flush=True)

    survived = [r for r in rows if r[1] == "SURVIVED" or r[1].startswith("n/a")]
    killed = len(rows) - len(survived)
    print(f"\n{killed} of {len(rows)} breaks killed", end="")
    print(f"; not killed: {', '.join(r[0] for r in survived)}" if survived else "")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
