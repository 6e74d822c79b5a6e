# ruff: noqa: E501
"""Refresh orchestration costs, measured side by side on a throwaway server.

    python benchmarks/bench_refresh.py [--rows 1000000] [--view-rows 200000]

Prints:
1. ``refresh_stale`` with nothing changed vs ``REFRESH ... CONCURRENTLY`` (target >= 50x);
2. write overhead of the change-tracking trigger: 100 statements of 1,000 rows into a
   tracked vs an untracked copy of the same table (target <= 15 %);
3. plain vs concurrent refresh time, and the worst latency a reader loop sees while each
   refresh runs (plain REFRESH takes ACCESS EXCLUSIVE: readers wait; CONCURRENTLY does not).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, refresh_stale, refresh_views
from sqlalchemy_matview.testing.launcher import PostgresServer


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--view-rows", type=int, default=200_000)
    args = parser.parse_args()

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
