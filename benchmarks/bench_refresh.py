# ruff: noqa: E501
"""Refresh orchestration costs, measured side by side on a throwaway server.

    python benchmarks/bench_refresh.py [--rows 1000000] [--view-rows 200000]
    python benchmarks/bench_refresh.py --planning [--baseline DIR] [--calls 40] [--rounds 3]

Prints:
1. ``refresh_stale`` with nothing changed vs ``REFRESH ... CONCURRENTLY`` (target >= 50x);
2. write overhead of the change-tracking trigger: 100 statements of 1,000 rows into a
   tracked vs an untracked copy of the same table (target <= 15 %);
3. plain vs concurrent refresh time, and the worst latency a reader loop sees while each
   refresh runs (plain REFRESH takes ACCESS EXCLUSIVE: readers wait; CONCURRENTLY does not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import _benchlib
import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, refresh_all, refresh_stale, refresh_views
from sqlalchemy_matview.testing.launcher import PostgresServer

try:
    from sqlalchemy_matview import Incremental
except ImportError:  # a baseline before incremental views
    Incremental = None


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# -- --planning ---------------------------------------------------------------------------

MANY = 200


def planning_metadata() -> tuple[sa.MetaData, sa.MetaData, dict[str, Any]]:
    """(one-view metadata, 200-view metadata, the views): declared alike in every process."""
    md = sa.MetaData()
    events = sa.Table(
        "p_events",
        md,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("v", sa.Integer, nullable=False),
    )
    per_day = sa.select(
        events.c.day, sa.func.count().label("n"), sa.func.sum(events.c.v).label("total")
    )
    per_day = per_day.group_by(events.c.day)
    views: dict[str, Any] = {
        "plain": MaterializedView("p_plain", md, per_day, unique_key="day", track_changes=True)
    }
    if Incremental is not None:
        views["inc"] = MaterializedView(
            "p_inc", md, per_day, incremental=Incremental(key="day", sources={events: events.c.day})
        )
    many = sa.MetaData()
    base = sa.Table("p_base", many, sa.Column("id", sa.Integer, primary_key=True))
    for i in range(MANY):
        MaterializedView(
            f"p_many_{i:03d}",
            many,
            sa.select(sa.func.count().label("n")).select_from(base).where(base.c.id > i),
            track_changes=True,
        )
    return md, many, views


def planning_worker(url: str, calls: int) -> None:
    """Time the calls in this process (whichever sqlalchemy_matview it imports); print JSON."""
    _, many, views = planning_metadata()
    engine = sa.create_engine(url)
    counts = {"statements": 0, "transactions": 0}

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(conn: object, cursor: object, statement: str, *_: object) -> None:
        counts["statements"] += 1
        if os.environ.get("BENCH_SHOW_STATEMENTS"):
            print(" ".join(statement.split())[:100], file=sys.stderr)

    @sa.event.listens_for(engine, "begin")
    def _begin(*_: object) -> None:
        counts["transactions"] += 1

    insert_one = sa.text("INSERT INTO p_events (day, v) VALUES (current_date, 1)")

    def dirty_one() -> None:
        with engine.begin() as conn:
            conn.execute(insert_one)

    cases: list[tuple[str, Any, Any]] = [
        ("refresh_views, 1 plain view", lambda: refresh_views(engine, views["plain"]), None),
        ("refresh_stale, 200 views, none stale", lambda: refresh_stale(engine, many), None),
    ]
    if "inc" in views:
        cases[1:1] = [
            (
                "refresh_views, 1 incremental, nothing dirty",
                lambda: refresh_views(engine, views["inc"]),
                None,
            ),
            (
                "refresh_views, 1 incremental, 1 dirty bucket",
                lambda: refresh_views(engine, views["inc"]),
                dirty_one,
            ),
        ]
    out = {}
    for label, call, prepare in cases:
        call()  # warm: the engine's first connection, the server's caches
        times = []
        sent = []
        for _ in range(calls):
            if prepare is not None:
                prepare()
            counts.update(statements=0, transactions=0)
            t0 = time.perf_counter()
            results = call()
            times.append(time.perf_counter() - t0)
            sent.append((counts["statements"], counts["transactions"]))
            assert all(r.status in ("refreshed", "skipped_fresh") for r in results), results
        statements, transactions = statistics.mode(sent)  # the same every call, in practice
        out[label] = {
            "ms": statistics.median(times) * 1000,
            "statements": statements,
            "transactions": transactions,
        }
    engine.dispose()
    print(json.dumps(out))


def planning_setup(url: str) -> None:
    """Create and fill the views with this process's sqlalchemy_matview (its bookkeeping
    version: each side of a comparison gets a database of its own)."""
    md, many, _ = planning_metadata()
    engine = sa.create_engine(url)
    md.create_all(engine)
    many.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO p_events (day, v)"
                " SELECT current_date - g % 90, g FROM generate_series(1, 10000) g"
            )
        )
        conn.execute(sa.text("INSERT INTO p_base SELECT generate_series(1, 100)"))
    refresh_all(engine, md)
    refresh_all(engine, many)
    engine.dispose()


def planning(args: argparse.Namespace) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    current = os.path.dirname(os.path.dirname(os.path.abspath(sa_matview_file())))
    sides = [("after", current)]
    if args.baseline:
        sides.insert(0, ("before", os.path.abspath(args.baseline)))
    with PostgresServer() as server:
        urls = {}
        for label, path in sides:
            urls[label] = str(server.url(server.create_database()).render_as_string(False))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, here])}
            cmd = [sys.executable, os.path.abspath(__file__), "--planning-setup", urls[label]]
            subprocess.run(cmd, env=env, check=True)
        print(f"PostgreSQL {server.version}; load average {_benchlib.load_average()} (start)")
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in sides}
        for _ in range(args.rounds):
            for label, path in sides:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, here])}
                proc = subprocess.run(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--planning-worker",
                        urls[label],
                        "--calls",
                        str(args.calls),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(
            f"load average {_benchlib.load_average()} (end); median of {args.rounds} rounds x {args.calls} calls"
        )
        header = f"{'':44}" + "".join(f"{label:>28}" for label, _ in sides)
        print(header)
        for case in runs[sides[-1][0]][0]:
            cells = []
            for label, _ in sides:
                rows = [r[case] for r in runs[label] if case in r]
                if not rows:
                    cells.append(f"{'-':>28}")
                    continue
                ms = statistics.median(r["ms"] for r in rows)
                cells.append(
                    f"{ms:8.2f} ms {rows[0]['statements']:3d} stmts {rows[0]['transactions']:2d} tx"
                )
            print(f"{case:44}" + "".join(f"{c:>28}" for c in cells))


def sa_matview_file() -> str:
    import sqlalchemy_matview

    return str(sqlalchemy_matview.__file__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--view-rows", type=int, default=200_000)
    parser.add_argument("--planning", action="store_true", help="only the per-call overhead")
    parser.add_argument("--baseline", help="a directory with another sqlalchemy_matview to compare")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--planning-worker", help=argparse.SUPPRESS)
    parser.add_argument("--planning-setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.planning_setup:
        planning_setup(args.planning_setup)
        return
    if args.planning_worker:
        planning_worker(args.planning_worker, args.calls)
        return
    if args.planning:
        planning(args)
        return

    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("grp", sa.Integer, nullable=False),
        sa.Column("v", sa.Integer, nullable=False),
    )
    per_group = sa.select(
        events.c.grp, sa.func.count().label("n"), sa.func.sum(events.c.v).label("total")
    ).group_by(events.c.grp)
    mv = MaterializedView(
        "mv_groups",
        md,
        per_group,
        columns=[sa.Column("n", sa.BigInteger), sa.Column("total", sa.BigInteger)],
        unique_key="grp",
        track_changes=True,
    )
    plain_t = sa.Table("bulk_plain", md, sa.Column("id", sa.BigInteger), sa.Column("v", sa.Integer))
    tracked_t = sa.Table(
        "bulk_tracked", md, sa.Column("id", sa.BigInteger), sa.Column("v", sa.Integer)
    )
    MaterializedView(
        "mv_bulk",
        md,
        sa.select(sa.func.count().label("n")).select_from(tracked_t),
        columns=[sa.Column("n", sa.BigInteger)],
        track_changes=True,
    )

    with PostgresServer(settings={"shared_buffers": "128MB", "work_mem": "64MB"}) as server:
        engine = sa.create_engine(server.url(server.create_database()))
        print(
            f"PostgreSQL {server.version}; source {args.rows:,} rows, view {args.view_rows:,} rows"
        )
        with engine.begin() as conn:
            events.create(conn)
            conn.execute(
                sa.text(
                    "INSERT INTO events SELECT g, g % :groups, (g * 7) % 1000"
                    " FROM generate_series(1, :rows) g"
                ),
                {"groups": args.view_rows, "rows": args.rows},
            )
            conn.execute(sa.text("ANALYZE events"))
        md.create_all(engine)

        # 1. nothing changed
        refresh_stale(engine, md)
        stale_t = best_of(5, lambda: refresh_stale(engine, md))
        conc_t = best_of(3, lambda: refresh_views(engine, mv, concurrently=True))
        print("\n1. refresh_stale (nothing changed) vs REFRESH CONCURRENTLY")
        print(f"   refresh_stale:            {stale_t * 1000:9.1f} ms")
        print(f"   REFRESH CONCURRENTLY:     {conc_t * 1000:9.1f} ms")
        print(f"   ratio:                    {conc_t / stale_t:9.0f}x cheaper (target >= 50x)")

        # 2. trigger write overhead
        batch = [{"id": i, "v": i} for i in range(1000)]

        def load(table: sa.Table) -> float:
            with engine.begin() as conn:
                conn.execute(sa.text(f"TRUNCATE {table.name}"))
            t0 = time.perf_counter()
            for _ in range(100):
                with engine.begin() as conn:
                    # One multi-row INSERT statement. (An executemany would send one
                    # statement per row with psycopg, firing the statement trigger per row.)
                    conn.execute(table.insert().values(batch))
            return time.perf_counter() - t0

        pairs = [(load(plain_t), load(tracked_t)) for _ in range(5)]
        plain_w = statistics.median(p for p, _ in pairs)
        tracked_w = statistics.median(t for _, t in pairs)
        print("\n2. 100 statements x 1,000 rows (one transaction each), median of 5")
        print(f"   untracked table:          {plain_w * 1000:9.1f} ms")
        print(f"   tracked table:            {tracked_w * 1000:9.1f} ms")
        print(
            f"   overhead:                 {(tracked_w / plain_w - 1) * 100:9.1f} % (target <= 15 %)"
        )

        # 3. plain vs concurrent, with a reader loop
        def with_reader(concurrently: bool) -> tuple[float, float, float]:
            stop = threading.Event()
            latencies: list[float] = []

            def reader() -> None:
                with engine.connect() as conn:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        conn.execute(sa.select(mv.c.total).where(mv.c.grp == 42)).all()
                        conn.rollback()
                        latencies.append(time.perf_counter() - t0)
                        time.sleep(0.002)

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(0.3)
            baseline = statistics.median(latencies)
            [result] = refresh_views(engine, mv, concurrently=concurrently)
            time.sleep(0.1)
            stop.set()
            thread.join()
            return result.duration, max(latencies), baseline

        plain = with_reader(False)
        conc = with_reader(True)
        print("\n3. refresh time and the worst reader latency during it")
        print(
            f"   plain REFRESH:            {plain[0] * 1000:9.1f} ms; reader worst {plain[1] * 1000:8.1f} ms"
            f" (baseline {plain[2] * 1000:.2f} ms)"
        )
        print(
            f"   REFRESH CONCURRENTLY:     {conc[0] * 1000:9.1f} ms; reader worst {conc[1] * 1000:8.1f} ms"
            f" (baseline {conc[2] * 1000:.2f} ms)"
        )
        engine.dispose()


if __name__ == "__main__":
    main()
