"""What readers see while a migration changes a view's definition: drop_create vs side_by_side.

    python benchmarks/bench_replace.py [--rows 1000000] [--view-rows 200000] [--rounds 1]

A throwaway server (durable settings: fsync, synchronous_commit and full_page_writes on) holds
a source table of ``--rows`` rows, a materialized view of ``--view-rows`` rows over it (one
per group, with a unique index) and a plain view reading that view. Four reader threads, each
on its own connection (psycopg, autocommit, queries prepared after 5 runs as psycopg does by
default), look up random groups in the view and in the dependent view, one query after the
other, for the whole run.

Each round runs ``op.replace_materialized_view`` through Alembic (in a transaction the
migration context owns, as ``alembic upgrade`` does) once per strategy, the two alternating
between the view's two definitions, which read the same rows. For each migration it prints the
migration's wall time, the longest time one read took while the migration ran (the worst
reader wait), the 99th percentile of those reads, how many reads completed, and how many
failed; for side_by_side, how long the swap took (from its log line: from the swap's first
statement to its commit). The first line is the readers alone for a few seconds: the
machine's own noise.
Target: with side_by_side, worst reader wait <= 100 ms and 0 failed reads.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field

import psycopg
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import sqlalchemy_matview.alembic
from sqlalchemy_matview.testing.launcher import PostgresServer

DEFINITIONS = [
    "SELECT grp, count(*) AS n, sum(v) AS total FROM events GROUP BY grp",
    # Same columns first, one more: the readers' prepared statements stay valid.
    "SELECT grp, count(*) AS n, sum(v) AS total, max(v) AS top FROM events GROUP BY grp",
]
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@dataclass
class Read:
    started: float
    spent: float
    failed: bool


@dataclass
class Readers:
    dsn: str
    groups: int
    threads: int = 4
    reads: list[Read] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(self.threads)]

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        queries = [
            "SELECT grp, n, total FROM mv_groups WHERE grp = %s",
            "SELECT grp, total FROM groups_big WHERE grp = %s",
        ]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                for query in queries:
                    started = time.perf_counter()
                    failed = False
                    try:
                        conn.execute(query, (rnd.randrange(self.groups),)).fetchall()
                    except psycopg.Error as exc:
                        failed = True
                        with self._lock:
                            self.errors.append(str(exc).splitlines()[0])
                    read = Read(started, time.perf_counter() - started, failed)
                    with self._lock:
                        self.reads.append(read)

    def start(self) -> Readers:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()

    def during(self, start: float, end: float) -> list[Read]:
        """Reads that were running at some point between ``start`` and ``end``."""
        with self._lock:
            return [r for r in self.reads if r.started < end and r.started + r.spent > start]


class SwapTimes(logging.Handler):
    """The swap durations that the side-by-side replace logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"swapped in (\d+) ms", record.getMessage())
        if found:
            self.times.append(float(found.group(1)))


def summary(
    label: str, reads: list[Read], seconds: float | None, swap_ms: float | None = None
) -> str:
    spent = sorted(r.spent for r in reads)
    p99 = spent[min(len(spent) - 1, int(len(spent) * 0.99))] if spent else 0.0
    failed = sum(r.failed for r in reads)
    took = f"{seconds:8.2f} s" if seconds is not None else " " * 10
    swap = f"{swap_ms:6.0f} ms" if swap_ms is not None else " " * 9
    return (
        f"{label:<14}{took}  {swap}  {spent[-1] * 1000 if spent else 0:9.1f} ms"
        f"  {p99 * 1000:7.1f} ms  {statistics.median(spent) * 1000 if spent else 0:7.2f} ms"
        f"  {len(reads):8,}  {failed:6}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--view-rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    sqlalchemy_matview.alembic.register()
    # The readers keep every read: a collection pass over them would stop all the threads and
    # show as a reader wait that PostgreSQL did not cause.
    gc.disable()
    swaps = SwapTimes()
    logger = logging.getLogger("alembic.runtime.sqlalchemy_matview")
    logger.addHandler(swaps)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    settings = {"shared_buffers": "128MB", "work_mem": "64MB", **DURABLE}
    with PostgresServer(settings=settings) as server:
        url = server.url(server.create_database())
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            for statement in [
                "CREATE TABLE events (id bigint PRIMARY KEY, grp int NOT NULL, v int NOT NULL)",
                "INSERT INTO events SELECT g, mod(g, :groups), mod(g * 7, 1000)"
                " FROM generate_series(1, :rows) g",
                "ANALYZE events",
                f"CREATE MATERIALIZED VIEW mv_groups AS {DEFINITIONS[0]}",
                "CREATE UNIQUE INDEX mv_groups_grp ON mv_groups (grp)",
                "CREATE VIEW groups_big AS SELECT grp, total FROM mv_groups WHERE n >= 5",
                "ANALYZE mv_groups",
            ]:
                conn.execute(sa.text(statement), {"groups": args.view_rows, "rows": args.rows})
            size = conn.scalar(sa.text("SELECT pg_total_relation_size('mv_groups')"))
        print(
            f"PostgreSQL {server.version}; source {args.rows:,} rows, view {args.view_rows:,} "
            f"rows ({size / 1e6:.0f} MB with its index) and a plain view on it; 4 readers; "
            "fsync, synchronous_commit, full_page_writes on"
        )
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        readers = Readers(dsn, args.view_rows).start()
        try:
            time.sleep(1.0)  # connections opened, statements prepared
            quiet_start = time.perf_counter()
            time.sleep(3.0)
            lines = [summary("readers alone", readers.during(quiet_start, quiet_start + 3.0), None)]
            current = 0
            for _ in range(args.rounds):
                for strategy in ("drop_create", "side_by_side"):
                    target = 1 - current
                    start = time.perf_counter()
                    with engine.connect() as conn:
                        context = MigrationContext.configure(conn)
                        with context.begin_transaction():
                            Operations(context).replace_materialized_view(
                                "mv_groups",
                                DEFINITIONS[target],
                                old_definition=DEFINITIONS[current],
                                strategy=strategy,
                            )
                    end = time.perf_counter()
                    current = target
                    time.sleep(0.5)  # reads waiting on the swap finish
                    swap_ms = swaps.times[-1] if strategy == "side_by_side" else None
                    lines.append(
                        summary(strategy, readers.during(start, end), end - start, swap_ms)
                    )
        finally:
            readers.stop()
        engine.dispose()

    print(
        f"\n{'':<14}{'migration':>10}  {'swap':>9}  {'worst wait':>12}  {'p99':>10}"
        f"  {'median':>10}  {'reads':>8}  {'failed':>6}"
    )
    for line in lines:
        print(line)
    if readers.errors:
        print("\nfailed reads:", *sorted(set(readers.errors)), sep="\n  ")
    print("\ntarget: side_by_side worst wait <= 100 ms and 0 failed reads")


if __name__ == "__main__":
    main()
