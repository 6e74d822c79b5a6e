"""What change tracking costs concurrent writers: ``pgbench`` on a tracked vs an untracked table.

    python benchmarks/bench_tracking_writers.py [--duration 10] [--rounds 3] [--clients 1,8]
        [--scripts insert,update,bulk] [--durability default|async|both] [--worker]
        [--partitioned]

One throwaway server (the project's launcher) holds two identical tables: ``ev_tracked``,
read by a materialized view declared with ``track_changes=True``, and ``ev_plain``, read by
nothing. For every script and client count, each round runs ``pgbench -n -f SCRIPT -c N -j 2
-T DURATION`` once per table; the side that goes first alternates from round to round so
neither side always gets the warmer (or the more loaded) half of the machine's time.

Scripts (one pgbench transaction = one autocommit statement = one writing transaction):

``insert``
    ``INSERT INTO <table> (grp, v) VALUES (random, 1)``
``update``
    ``UPDATE <table> SET v = v + 1 WHERE id = random(1, 100000)`` (100,000 rows preloaded)
``bulk`` (not run by default)
    one ``INSERT ... SELECT`` of 1,000 rows: what per-row trigger work costs

``--partitioned`` makes both tables hash-partitioned (written through the parent).

Durability: ``default`` is the server's own defaults (``fsync``, ``synchronous_commit``,
``full_page_writes`` on: the launcher's speed settings are undone); ``async`` is the same
with ``synchronous_commit = off``. ``both`` runs the whole set on one server, switching with
``ALTER DATABASE ... SET``.

While the tracked side runs, a sampler reads the wait events of pgbench's backends from
``pg_stat_activity`` every 20 ms; the report shows the most frequent ones (``CPU`` = not
waiting). With ``--worker`` a :class:`~sqlalchemy_matview.RefreshWorker` (debounce 0.1 s)
refreshes the view during every run (both sides, so both pay for its load), so the view
keeps going fresh -> stale, and the writers that commit while it refreshes take the
trigger's late path; without it nothing refreshes and the view stays stale after the first
write: the change log holds that one mark, and each writer finds it and adds nothing (the
trigger's hot path).

Prints the median TPS of each side, the ratio tracked/untracked (median of the per-round
ratios, with their range), the load average around each set, and the PostgreSQL version.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import _benchlib
import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, RefreshWorker, refresh_stale
from sqlalchemy_matview.testing.launcher import PostgresServer

SIDES = ("tracked", "untracked")
TABLES = {"tracked": "ev_tracked", "untracked": "ev_plain"}
PRELOAD = 100_000

SCRIPTS = {
    "insert": "\\set g random(1, 1000)\nINSERT INTO {table} (grp, v) VALUES (:g, 1);\n",
    "update": f"\\set id random(1, {PRELOAD})\nUPDATE {{table}} SET v = v + 1 WHERE id = :id;\n",
    "bulk": "INSERT INTO {table} (grp, v) SELECT g % 1000, 1 FROM generate_series(1, 1000) g;\n",
}
PARTITIONS = 4


@dataclass
class Cell:
    """One (durability, script, clients) combination: TPS per side per round."""

    tps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    waits: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: int = 0
    load: list[float] = field(default_factory=list)


class WaitSampler:
    """Counts the wait events of pgbench's backends until stopped."""

    def __init__(self, engine: sa.Engine, database: str) -> None:
        self.engine = engine
        self.database = database
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        query = sa.text(
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w"
            " FROM pg_stat_activity"
            " WHERE application_name = 'pgbench' AND datname = :db AND state = 'active'"
        )
        with self.engine.connect() as conn:
            while not self._stop.wait(0.02):
                for (wait,) in conn.execute(query, {"db": self.database}):
                    self.counts[wait] += 1
                    self.samples += 1
                conn.rollback()


def declare(partitioned: bool = False) -> sa.MetaData:
    md = sa.MetaData()
    for name in TABLES.values():
        table = sa.Table(
            name,
            md,
            sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
            sa.Column("grp", sa.Integer, nullable=False),
            sa.Column("v", sa.Integer, nullable=False),
            **({"postgresql_partition_by": "HASH (id)"} if partitioned else {}),
        )
        for i in range(PARTITIONS if partitioned else 0):
            sa.event.listen(
                table,
                "after_create",
                sa.DDL(
                    f"CREATE TABLE {name}_p{i} PARTITION OF {name}"
                    f" FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
                ),
            )
    tracked = md.tables[TABLES["tracked"]]
    MaterializedView(
        "mv_tracked",
        md,
        sa.select(sa.func.count().label("n"), sa.func.sum(tracked.c.v).label("total")),
        columns=[sa.Column("n", sa.BigInteger), sa.Column("total", sa.BigInteger)],
        track_changes=True,
    )
    return md


@dataclass
class Run:
    """One ``pgbench`` invocation against one table."""

    exe: str
    server: PostgresServer
    database: str
    script: Path
    clients: int

    def measure(self, duration: int, sample_into: Cell | None) -> float:
        """TPS over ``duration`` seconds; with ``sample_into``, its backends' waits too."""
        if sample_into is None:
            return self._pgbench(duration)
        engine = sa.create_engine(self.server.url(self.database))
        try:
            with WaitSampler(engine, self.database) as sampler:
                tps = self._pgbench(duration)
        finally:
            engine.dispose()
        sample_into.waits.update(sampler.counts)
        sample_into.samples += sampler.samples
        return tps

    def _pgbench(self, duration: int) -> float:
        return _benchlib.pgbench_tps(
            self.exe, self.server, self.database, self.script, self.clients, duration
        )


def set_durability(engine: sa.Engine, database: str, mode: str) -> None:
    _benchlib.set_synchronous_commit(engine, database, "off" if mode == "async" else "on")


def reset_tables(engine: sa.Engine, md: sa.MetaData) -> None:
    """Same starting point for every run: the preloaded rows, a vacuumed heap, no change log."""
    with engine.begin() as conn:
        for table in TABLES.values():
            conn.execute(sa.text(f"TRUNCATE {table} RESTART IDENTITY"))
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (grp, v) SELECT g % 1000, 0 FROM generate_series(1, :n) g"
                ),
                {"n": PRELOAD},
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # Clears the change rows the preload left behind (wherever the bookkeeping lives).
        refresh_stale(engine, md)
        for table in TABLES.values():
            conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
        conn.execute(sa.text("CHECKPOINT"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts")
    parser.add_argument("--scripts", default="insert,update", help=",".join(SCRIPTS))
    parser.add_argument("--durability", choices=("default", "async", "both"), default="both")
    parser.add_argument("--worker", action="store_true", help="a RefreshWorker runs meanwhile")
    parser.add_argument(
        "--partitioned",
        action="store_true",
        help=f"both tables hash-partitioned on id into {PARTITIONS} (written through the parent)",
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    scripts = [s.strip() for s in args.scripts.split(",")]
    for s in scripts:
        if s not in SCRIPTS:
            parser.error(f"unknown script {s!r}; pick from {', '.join(SCRIPTS)}")
    modes = ["default", "async"] if args.durability == "both" else [args.durability]

    md = declare(args.partitioned)
    settings = {**_benchlib.DURABLE, "shared_buffers": "128MB", "max_connections": "100"}
    results: dict[tuple[str, str, int], Cell] = {}
    with PostgresServer(settings=settings) as server, tempfile.TemporaryDirectory() as tmp:
        exe = _benchlib.find_pgbench(server)
        database = server.create_database()
        engine = sa.create_engine(server.url(database))
        md.create_all(engine)
        with engine.connect() as conn:
            version = conn.scalar(sa.text("SHOW server_version"))
            triggers = conn.execute(
                sa.text(
                    "SELECT tgrelid::regclass::text || ': ' || tgname || ' (tgtype '"
                    " || tgtype || ', ' || tgenabled::text || ')' FROM pg_trigger"
                    " WHERE NOT tgisinternal ORDER BY 1"
                )
            ).scalars()
            trigger_list = list(triggers)
        print(
            f"PostgreSQL {version}; {os.cpu_count()} CPUs ({platform.machine()}); pgbench {exe}\n"
            f"{args.duration} s x {args.rounds} rounds per cell, -j 2, {PRELOAD:,} rows preloaded,"
            f" worker {'on' if args.worker else 'off'},"
            f" {f'{PARTITIONS} hash partitions' if args.partitioned else 'plain tables'}\n"
            f"triggers: {'; '.join(trigger_list) or 'none'}"
        )
        paths: dict[tuple[str, str], Path] = {}
        for script in scripts:
            for side, table in TABLES.items():
                path = Path(tmp) / f"{script}_{side}.sql"
                path.write_text(SCRIPTS[script].format(table=table))
                paths[(script, side)] = path

        refreshes: list[str] = []
        worker = (
            RefreshWorker(engine, md, debounce=0.1, on_result=lambda r: refreshes.append(r.status))
            if args.worker
            else None
        )
        if worker is not None:
            worker.start()
        try:
            for mode in modes:
                set_durability(engine, database, mode)
                for script in scripts:
                    for n in clients:
                        cell = results.setdefault((mode, script, n), Cell())
                        for rnd in range(args.rounds):
                            order = SIDES if rnd % 2 == 0 else SIDES[::-1]
                            for side in order:
                                reset_tables(engine, md)
                                cell.load.append(os.getloadavg()[0])
                                run = Run(exe, server, database, paths[(script, side)], n)
                                tps = run.measure(
                                    args.duration, cell if side == "tracked" else None
                                )
                                cell.tps[side].append(tps)
                                print(
                                    f"  {mode:7} {script:6} c={n:<2} round {rnd + 1} {side:9}"
                                    f" {tps:9.0f} tps",
                                    flush=True,
                                )
        finally:
            if worker is not None:
                worker.stop(timeout=30)
            engine.dispose()

    print(
        "\ndurability script  clients  tracked tps  untracked tps  ratio (range)       "
        "load    top waits of the tracked side (share of backend samples)"
    )
    for (mode, script, n), cell in results.items():
        tracked = statistics.median(cell.tps["tracked"])
        plain = statistics.median(cell.tps["untracked"])
        ratios = [t / p for t, p in zip(cell.tps["tracked"], cell.tps["untracked"], strict=True)]
        top = ", ".join(f"{w} {c / max(cell.samples, 1):.0%}" for w, c in cell.waits.most_common(4))
        # The NOTIFY queue's lock, which writers queue on when they notify: always shown.
        top += f"; Lock:object {cell.waits['Lock:object'] / max(cell.samples, 1):.1%}"
        label = "sync_commit=off" if mode == "async" else "default"
        print(
            f"{label:15} {script:6} {n:>3} {tracked:12.0f} {plain:14.0f}"
            f"  {statistics.median(ratios):5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            f"  {min(cell.load):.1f}-{max(cell.load):.1f}  {top}"
        )
    if args.worker:
        print(f"the worker refreshed {refreshes.count('refreshed')} times in all")


if __name__ == "__main__":
    main()
