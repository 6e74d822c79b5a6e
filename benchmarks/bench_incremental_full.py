"""An incremental view's full recompute against a plain REFRESH, every key changed, side by side.

    python benchmarks/bench_incremental_full.py [--events 1000000] [--users 50000]
        [--rounds 8] [--before PATH]

The per-user totals of ``bench_incremental.py`` (count and sum per ``user_id``) over the same
``events``, as a plain materialized view with a unique index and as an incremental view
(``key="user_id"``). Each round inserts one row for every user, times a plain REFRESH and
the incremental view's refresh function (a full recompute: every key is dirty) in rotating
order, then deletes the round's rows, lets the incremental view consume that deletion and
vacuums ``events``: every round reads the same rows (``bench_incremental.py`` adds rows at
every run, so its later runs read more than its first).

``--before PATH``: also an incremental view built by the checkout at PATH (another version
of this library, e.g. ``git archive <sha> | tar -x -C PATH``), refreshed in the rotation.

Prints each round, the medians, the ratios to REFRESH, and the tables' sizes in pages.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time

import _benchlib
import psycopg
import sqlalchemy as sa
from bench_incremental import declare_events, load_events

from sqlalchemy_matview.testing.launcher import PostgresServer

# Run by the checkout that builds the view (the current one, or --before's): prints the
# name of the view's refresh function.
_CREATE = """
import sys
sys.path.insert(0, sys.argv[3])
import sqlalchemy as sa
from bench_incremental import declare_events, per_user
from sqlalchemy_matview import Incremental, MaterializedView
from sqlalchemy_matview.incremental import names_for
base = sa.MetaData()
events = declare_events(base, "events")
md = sa.MetaData()
MaterializedView(sys.argv[2], md, per_user(events),
                 incremental=Incremental(key="user_id", sources={events: events.c.user_id}))
md.create_all(sa.create_engine(sys.argv[1]))
print(names_for("public", sys.argv[2]).refresh)
"""


def create_incremental(url: str, name: str, checkout: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", _CREATE, url, name, here],
        env={**os.environ, "PYTHONPATH": checkout},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--before", help="a checkout of another version to compare with")
    args = parser.parse_args()

    settings = {**_benchlib.DURABLE, "shared_buffers": "256MB", "work_mem": "64MB"}
    with PostgresServer(settings=settings) as server:
        database = server.create_database()
        url = server.url(database)
        engine = sa.create_engine(url)
        md = sa.MetaData()
        declare_events(md, "events")
        declare_events(md, "events_plain")  # load_events fills it too
        md.create_all(engine)
        load_events(engine, args.events, 90, args.users)
        engine.dispose()
        full_url = url.render_as_string(hide_password=False)
        current = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        functions = {"current": create_incremental(full_url, "users_current", current)}
        if args.before:
            functions["before"] = create_incremental(full_url, "users_before", args.before)
        sides = ["plain", *functions]
        times: dict[str, list[float]] = {side: [] for side in sides}
        with psycopg.connect(full_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(
                "CREATE MATERIALIZED VIEW users_plain AS SELECT user_id, count(*) AS events,"
                " sum(amount) AS total FROM events GROUP BY user_id"
            )
            conn.execute("CREATE UNIQUE INDEX ON users_plain (user_id)")
            conn.execute("VACUUM ANALYZE")
            print(
                f"PostgreSQL {server.version}; {args.events:,} events, {args.users:,} users;"
                f" {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC;"
                f" load {_benchlib.load_average()}; ms per round:",
                flush=True,
            )
            for rnd in range(args.rounds):
                conn.execute(
                    "INSERT INTO events (created_at, user_id, kind, amount)"
                    " SELECT now(), u, 'view', 0 FROM generate_series(1, %s) u",
                    (args.users,),
                )
                for side in sides[rnd % len(sides) :] + sides[: rnd % len(sides)]:
                    start = time.perf_counter()
                    with conn.transaction():
                        if side == "plain":
                            conn.execute("REFRESH MATERIALIZED VIEW users_plain")
                        else:
                            row = conn.execute(
                                f"SELECT * FROM sqlalchemy_matview.{functions[side]}(1)"
                            ).fetchone()
                            assert row is not None and row[2], f"{side}: not a full recompute"
                    times[side].append(time.perf_counter() - start)
                conn.execute("DELETE FROM events WHERE id > %s", (args.events,))
                for function in functions.values():
                    conn.execute(f"SELECT * FROM sqlalchemy_matview.{function}(1)")
                conn.execute("VACUUM events")
                print(
                    f"   round {rnd + 1}: "
                    + ", ".join(f"{s} {times[s][-1] * 1000:.0f}" for s in sides)
                    + f"; load {_benchlib.load_average()}",
                    flush=True,
                )
            pages = dict(
                conn.execute(
                    "SELECT relname::text, pg_relation_size(oid) / 8192 FROM pg_class"
                    " WHERE relname IN ('users_plain', 'users_current', 'users_before')"
                ).fetchall()
            )
    plain = statistics.median(times["plain"])
    print(f"REFRESH: median {plain * 1000:.0f} ms, {pages['users_plain']} pages")
    for side in functions:
        ratios = [t / p for t, p in zip(times[side], times["plain"], strict=True)]
        median = statistics.median(times[side])
        print(
            f"{side}: median {median * 1000:.0f} ms, {median / plain:.2f}x REFRESH (rounds"
            f" {min(ratios):.2f}-{max(ratios):.2f}), {pages[f'users_{side}']} pages"
        )
    print(f"load at the end: {_benchlib.load_average()}")


if __name__ == "__main__":
    main()
