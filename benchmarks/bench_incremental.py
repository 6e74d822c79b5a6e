# ruff: noqa: E501
"""Incremental refresh against REFRESH and REFRESH CONCURRENTLY, side by side on one server.

    python benchmarks/bench_incremental.py [--events 1000000] [--days 90] [--users 50000]
        [--runs 5] [--pgbench-duration 10] [--pgbench-rounds 3] [--clients 8]
        [--skip-pgbench] [--skip-per-user]

One throwaway server with PostgreSQL's own durability (fsync, synchronous_commit and
full_page_writes on: the launcher's speed settings are undone) holds ``events``: ``--events``
rows over ``--days`` UTC days ending today, inserted in time order (the heap is correlated
with the bucket), users 1..``--users``, 10 % purchases, with an index on the UTC day of
``created_at`` (the bucket expression, so recomputing a bucket is an index range scan) and
one on ``user_id``.

1. **The README's dashboard** (per UTC day: count, count(DISTINCT user_id), sum FILTER),
   declared twice over ``events``: (a) ``incremental=Incremental(key="day", sources={events:
   day})`` with the IMMUTABLE bucket ``CAST(timezone('UTC', created_at) AS DATE)``, and (b) a
   plain materialized view with a unique index on ``day``. For each change -- nothing, 1 row
   today, 1,000 rows today, 10,000 rows over the last 30 days, one row in every day -- each
   run makes the change (untimed), then times ``refresh_views`` of (a), of (b) plain and of
   (b) CONCURRENTLY; it prints the medians of ``--runs`` runs and the ratios (b)/(a). The
   "(function)" column is (a)'s refresh function alone, in a transaction of its own, after
   the same change made again (the two take turns at coming first after the previous run's
   plain refreshes, which leave catalog invalidations and WAL to the next transaction; an
   even ``--runs`` gives both the same share): what ``refresh_views`` adds to it is its
   planning (one catalog read with the bookkeeping's owner check), paid by (b) too. After
   each change's runs the incremental table is compared with the definition computed from
   scratch (it must be exact).
   Targets: >= 50x cheaper than CONCURRENTLY after 1 row today, >= 30x after 1,000 rows
   today; when every day is dirty, no more than 1.2x a plain REFRESH.
2. **Write cost**: ``pgbench -n -c N -j 2 -T D``, single-row INSERT transactions (one row
   today each), into ``events`` (the incremental view's triggers) vs ``events_plain`` (the
   same table, rows and indexes, no trigger); the side that goes first alternates by round;
   the view is refreshed and both tables vacuumed between runs. Target: >= 0.7x.
3. **Per-user totals** (per user: count, sum), the same way with ``key="user_id"``: nothing,
   1 row, 1,000 rows of random users, 10,000 rows of random users, one row for every user.

The load average (as ``uptime`` prints it) is printed with every section. Figures from a
machine shared with other work are noisy: compare the ratios of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _benchlib
import sqlalchemy as sa

import sqlalchemy_matview
from sqlalchemy_matview import MaterializedView, refresh_views
from sqlalchemy_matview.testing.launcher import PostgresServer

Incremental: Any = getattr(sqlalchemy_matview, "Incremental", None)
if Incremental is not None:
    from sqlalchemy_matview.orchestration.incremental import refresh_incremental

INSERT_SCRIPT = (
    "\\set u random(1, 50000)\n"
    "INSERT INTO {table} (created_at, user_id, kind, amount) VALUES (now(), :u, 'view', 0);\n"
)


def declare_events(md: sa.MetaData, name: str) -> sa.Table:
    table = sa.Table(
        name,
        md,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.Numeric(10, 2), nullable=False, server_default="0"),
    )
    sa.Index(f"ix_{name}_day", utc_day(table))
    sa.Index(f"ix_{name}_user_id", table.c.user_id)
    return table


def utc_day(events: sa.Table) -> sa.ColumnElement[Any]:
    """The IMMUTABLE bucket: timezone('UTC', timestamptz) does not read the session's TimeZone."""
    return sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)


def dashboard(events: sa.Table) -> sa.Select[Any]:
    day = utc_day(events)
    return sa.select(
        day.label("day"),
        sa.func.count().label("events"),
        sa.func.count(events.c.user_id.distinct()).label("unique_users"),
        sa.func.coalesce(sa.func.sum(events.c.amount).filter(events.c.kind == "purchase"), 0).label(
            "revenue"
        ),
    ).group_by(day)


def per_user(events: sa.Table) -> sa.Select[Any]:
    return sa.select(
        events.c.user_id,
        sa.func.count().label("events"),
        sa.func.sum(events.c.amount).label("total"),
    ).group_by(events.c.user_id)


@dataclass
class Pair:
    """One aggregate declared twice: (a) incremental (None without the feature), (b) plain."""

    metadata: sa.MetaData
    incremental: MaterializedView | None
    plain: MaterializedView


def declare_pair(
    events: sa.Table, name: str, query: sa.Select[Any], key: str, bucket: sa.ColumnElement[Any]
) -> Pair:
    md = sa.MetaData()
    inc = None
    if Incremental is not None:
        inc = MaterializedView(
            f"{name}_inc",
            md,
            query,
            incremental=Incremental(key=key, sources={events: bucket}),
        )
    plain = MaterializedView(f"{name}_plain", md, query, unique_key=key)
    return Pair(md, inc, plain)


@dataclass
class Scenario:
    label: str
    change: str  # SQL run (untimed) before each timed refresh; "" for no change
    params: dict[str, Any]


def dashboard_scenarios(days: int) -> list[Scenario]:
    ins = "INSERT INTO events (created_at, user_id, kind, amount) "
    return [
        Scenario("nothing dirty", "", {}),
        Scenario("1 row today", ins + "VALUES (now(), 7, 'purchase', 10)", {}),
        Scenario(
            "1,000 rows today",
            ins + "SELECT now(), 1 + g % 5000, 'view', 0 FROM generate_series(1, 1000) g",
            {},
        ),
        Scenario(
            "10,000 rows over 30 days",
            ins + "SELECT now() - random() * interval '30 days', 1 + g % 5000,"
            " 'purchase', 1 FROM generate_series(1, 10000) g",
            {},
        ),
        Scenario(
            f"a row in every day ({days})",
            ins + "SELECT now() - make_interval(days => d), 3, 'view', 0"
            " FROM generate_series(0, :days - 1) d",
            {"days": days},
        ),
    ]


def per_user_scenarios(users: int) -> list[Scenario]:
    ins = "INSERT INTO events (created_at, user_id, kind, amount) "
    rnd = "1 + floor(random() * :users)::int"
    return [
        Scenario("nothing dirty", "", {}),
        Scenario("1 row", ins + f"VALUES (now(), {rnd}, 'purchase', 10)", {"users": users}),
        Scenario(
            "1,000 rows, random users",
            ins + f"SELECT now(), {rnd}, 'purchase', 1 FROM generate_series(1, 1000)",
            {"users": users},
        ),
        Scenario(
            "10,000 rows, random users",
            ins + f"SELECT now(), {rnd}, 'purchase', 1 FROM generate_series(1, 10000)",
            {"users": users},
        ),
        Scenario(
            f"a row for every user ({users:,})",
            ins + "SELECT now(), u, 'view', 0 FROM generate_series(1, :users) u",
            {"users": users},
        ),
    ]


def load_events(engine: sa.Engine, events: int, days: int, users: int) -> None:
    """``events`` rows spread evenly over ``days`` UTC days ending today, in time order."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT setseed(0.42)"))
        conn.execute(
            sa.text(
                """
                INSERT INTO events (created_at, user_id, kind, amount)
                SELECT start + (g::float8 / :n) * make_interval(days => :days),
                       1 + floor(random() * :users)::int,
                       CASE WHEN r < 0.10 THEN 'purchase' WHEN r < 0.40 THEN 'click' ELSE 'view' END,
                       CASE WHEN r < 0.10 THEN round((5 + random() * 95)::numeric, 2) ELSE 0 END
                  FROM (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                               - make_interval(days => :days - 1) AS start) AS s,
                       LATERAL (SELECT g, random() AS r FROM generate_series(0, :n - 1) g) AS x
                 ORDER BY g
                """
            ),
            {"n": events, "days": days, "users": users},
        )
        # The write-cost comparison's twin: same rows, same indexes, no trigger.
        conn.execute(
            sa.text(
                "INSERT INTO events_plain (created_at, user_id, kind, amount)"
                " SELECT created_at, user_id, kind, amount FROM events ORDER BY id"
            )
        )
    vacuum(engine, "events", "events_plain")


def vacuum(engine: sa.Engine, *tables: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
        conn.execute(sa.text("CHECKPOINT"))


def difference(engine: sa.Engine, view: MaterializedView) -> int:
    """Rows in the view and not in its definition computed now, plus the reverse."""
    stored = sa.select(view.table)
    fresh = view.definition
    with engine.connect() as conn:
        missing = conn.scalar(
            sa.select(sa.func.count()).select_from(fresh.except_(stored).subquery())
        )
        extra = conn.scalar(
            sa.select(sa.func.count()).select_from(stored.except_(fresh).subquery())
        )
    return int(missing or 0) + int(extra or 0)


def timed(engine: sa.Engine, view: MaterializedView, **options: Any) -> tuple[float, str]:
    """Wall time of ``refresh_views(engine, view)`` (what an application pays, lock included)
    and what an incremental refresh did (``full``, or how many buckets it recomputed)."""
    start = time.perf_counter()
    [result] = refresh_views(engine, view, **options)
    spent = time.perf_counter() - start
    if result.status != "refreshed":
        raise SystemExit(f"{view.name}: refresh {result.status}: {result!r}")
    done = getattr(result, "full_refresh", None)
    return spent, "full" if done else f"{getattr(result, 'buckets', None)}"


def function_alone(engine: sa.Engine, view: MaterializedView) -> float:
    """Wall time of the view's refresh function in a transaction of its own, without
    ``refresh_views``' planning (catalog reads, dependency graph, bookkeeping checks)."""
    start = time.perf_counter()
    with engine.begin() as conn:
        refresh_incremental(conn, view)
    return time.perf_counter() - start


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:10.1f}"


def ratio(full: float, inc: float | None) -> str:
    return "-" if inc is None else f"{full / inc:8.1f}x"


def compare(engine: sa.Engine, pair: Pair, scenarios: list[Scenario], runs: int) -> None:
    """For each scenario: medians of (a), (b) plain, (b) CONCURRENTLY, and the ratios."""
    print(
        f"   {'change':32} {'incremental':>11} {'(function)':>10} {'REFRESH':>10} {'CONCURR.':>10}"
        f" {'x plain':>9} {'x conc.':>9} {'(fn x conc.)':>12}  exact  {'recomputed':12} load (1/5/15 min)"
    )
    for scenario in scenarios:
        times: dict[str, list[float]] = {"inc": [], "fn": [], "plain": [], "conc": []}
        did: list[str] = []

        def change(s: Scenario = scenario) -> None:
            if s.change:
                with engine.begin() as conn:
                    conn.execute(sa.text(s.change), s.params)

        for run in range(runs):
            if pair.incremental is None:
                change()
            # Whichever comes first after the previous run's plain refreshes pays for their
            # catalog invalidations and WAL: refresh_views and the function alone take turns.
            first = ("inc", "fn") if run % 2 == 0 else ("fn", "inc")
            for which in first:
                if pair.incremental is None:
                    break
                change()
                if which == "inc":
                    spent, what = timed(engine, pair.incremental)
                    times["inc"].append(spent)
                    did.append(what)
                else:
                    times["fn"].append(function_alone(engine, pair.incremental))
            times["plain"].append(timed(engine, pair.plain, concurrently=False)[0])
            times["conc"].append(timed(engine, pair.plain, concurrently=True)[0])
        inc = statistics.median(times["inc"]) if times["inc"] else None
        fn = statistics.median(times["fn"]) if times["fn"] else None
        plain = statistics.median(times["plain"])
        conc = statistics.median(times["conc"])
        exact = "-"
        if pair.incremental is not None:
            diff = difference(engine, pair.incremental)
            exact = "yes" if diff == 0 else f"NO ({diff} rows differ)"
        print(
            f"   {scenario.label:32} {ms(inc):>11} {ms(fn)} {ms(plain)} {ms(conc)}"
            f" {ratio(plain, inc):>9} {ratio(conc, inc):>9} {ratio(conc, fn):>12}  {exact:5}"
            f"  {'/'.join(dict.fromkeys(did)) or '-':12} {_benchlib.load_average()}",
            flush=True,
        )


def write_cost(
    server: PostgresServer,
    engine: sa.Engine,
    database: str,
    pair: Pair,
    clients: int,
    duration: int,
    rounds: int,
) -> None:
    exe = _benchlib.find_pgbench(server)
    tps: dict[str, list[float]] = {"events": [], "events_plain": []}
    loads: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {}
        for table in tps:
            scripts[table] = Path(tmp) / f"{table}.sql"
            scripts[table].write_text(INSERT_SCRIPT.format(table=table))
        for rnd in range(rounds):
            order = list(tps) if rnd % 2 == 0 else list(tps)[::-1]
            for table in order:
                if pair.incremental is not None:
                    refresh_views(engine, pair.incremental)  # an empty log for every run
                vacuum(engine, "events", "events_plain")
                loads.append(_benchlib.load_average())
                tps[table].append(
                    _benchlib.pgbench_tps(exe, server, database, scripts[table], clients, duration)
                )
                print(f"   round {rnd + 1} {table:13} {tps[table][-1]:9.0f} tps", flush=True)
    ratios = [t / p for t, p in zip(tps["events"], tps["events_plain"], strict=True)]
    print(
        f"   with incremental triggers {statistics.median(tps['events']):9.0f} tps,"
        f" without {statistics.median(tps['events_plain']):9.0f} tps:"
        f" {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f};"
        " target >= 0.7x)"
    )
    print(f"   load before each run: {'; '.join(loads)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5, help="runs per change (the median is shown)")
    parser.add_argument("--pgbench-duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--pgbench-rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-pgbench", action="store_true")
    parser.add_argument("--skip-per-user", action="store_true")
    args = parser.parse_args()

    base = sa.MetaData()
    events = declare_events(base, "events")
    declare_events(base, "events_plain")
    dash = declare_pair(events, "dashboard", dashboard(events), "day", utc_day(events))
    users = declare_pair(events, "user_totals", per_user(events), "user_id", events.c.user_id)

    settings = {**_benchlib.DURABLE, "shared_buffers": "256MB", "work_mem": "64MB"}
    with PostgresServer(settings=settings) as server:
        database = server.create_database()
        engine = sa.create_engine(server.url(database))
        base.create_all(engine)
        load_events(engine, args.events, args.days, args.users)
        print(
            f"PostgreSQL {server.version}; {os.cpu_count()} CPUs ({platform.machine()});"
            f" durable (fsync, synchronous_commit, full_page_writes on), shared_buffers 256MB,"
            f" work_mem 64MB\n{args.events:,} events over {args.days} UTC days in time order,"
            f" {args.users:,} users; medians of {args.runs} runs; times in ms;"
            f" load {_benchlib.load_average()}"
        )
        if Incremental is None:
            print("(this checkout has no sqlalchemy_matview.Incremental: plain side only)")

        dash.metadata.create_all(engine)
        print("\n1. Dashboard per UTC day (count, count DISTINCT, sum FILTER)")
        compare(engine, dash, dashboard_scenarios(args.days), args.runs)

        if not args.skip_pgbench:
            print(
                f"\n2. Write cost: pgbench -c {args.clients} -j 2 -T {args.pgbench_duration},"
                " single-row INSERT transactions, default durability"
            )
            if dash.incremental is None:
                print("   skipped: no incremental view to put triggers on events")
            else:
                write_cost(
                    server,
                    engine,
                    database,
                    dash,
                    args.clients,
                    args.pgbench_duration,
                    args.pgbench_rounds,
                )
        dash.metadata.drop_all(engine)

        if not args.skip_per_user:
            vacuum(engine, "events")
            users.metadata.create_all(engine)
            print("\n3. Per-user totals (count, sum per user_id)")
            compare(engine, users, per_user_scenarios(args.users), args.runs)
        engine.dispose()
    print(f"\nload at the end: {_benchlib.load_average()}")


if __name__ == "__main__":
    main()
