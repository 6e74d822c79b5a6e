"""Plumbing shared by the benchmark scripts: durable servers, ``pgbench`` runs, load average.

Imported by the scripts of this folder as ``import _benchlib`` (a script's own folder is
first on ``sys.path`` when it runs as ``python benchmarks/bench_x.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_matview.testing.launcher import PostgresServer

# The launcher starts servers for speed (fsync off...); this puts PostgreSQL's own back.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def find_pgbench(server: PostgresServer) -> str:
    """The ``pgbench`` of the server's installation, else the one on ``PATH``."""
    beside = server.installation.bindir / "pgbench"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("pgbench")
    if found is None:
        sys.exit("pgbench not found (Debian: postgresql-15 ships it in /usr/lib/postgresql/15/bin)")
    return found


def pgbench_tps(
    exe: str, server: PostgresServer, database: str, script: Path, clients: int, duration: int
) -> float:
    """TPS of ``pgbench -n -f script -c clients -j min(2, clients) -T duration``."""
    cmd = [
        exe,
        "-n",  # no vacuum of pgbench's own tables: there are none
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(min(2, clients)),
        "-T",
        str(duration),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        database,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    match = _TPS.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        sys.exit(f"pgbench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return float(match.group(1))


def set_synchronous_commit(engine: sa.Engine, database: str, value: str) -> None:
    """Per database: the server's command line (``-c``) would override ``ALTER SYSTEM``."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        target = conn.dialect.identifier_preparer.quote(database)
        conn.execute(sa.text(f"ALTER DATABASE {target} SET synchronous_commit = {value}"))
    fresh = sa.create_engine(engine.url, poolclass=sa.NullPool)  # a new session, like pgbench's
    with fresh.connect() as conn:
        seen = conn.scalar(sa.text("SHOW synchronous_commit"))
    fresh.dispose()
    if seen != value:
        sys.exit(f"synchronous_commit is {seen!r} in a new session, wanted {value!r}")
