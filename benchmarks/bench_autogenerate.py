"""Alembic autogenerate with 100 materialized views, side by side with 100 plain tables.

Run it on demand (it starts its own throwaway PostgreSQL server)::

    python benchmarks/bench_autogenerate.py [--views 100] [--repeat 5]

For each of two cases -- an empty database (everything must be created) and a database in
sync with the models (nothing to do) -- it times ``produce_migrations`` for:

* ``views``: one table plus N ``MaterializedView`` objects over it, each with a unique key;
* ``tables``: the same table plus N plain tables with the same columns and index, compared by
  plain Alembic.

It prints the median times, the number of SQL statements sent, and the ratio views/tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import produce_migrations
from alembic.migration import MigrationContext

import sqlalchemy_matview.alembic
from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.testing.launcher import PostgresServer


def view_models(n: int) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
    )
    for i in range(n):
        MaterializedView(
            f"mv_{i:03d}",
            md,
            sa.select(events.c.kind, sa.func.count().label("n"))
            .where(events.c.id > i)
            .group_by(events.c.kind),
            unique_key="kind",
        )
    return md


def table_models(n: int) -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
    )
    for i in range(n):
        t = sa.Table(
            f"t_{i:03d}",
            md,
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("n", sa.BigInteger),
        )
        sa.Index(f"t_{i:03d}_unique_key", t.c.kind, unique=True)
    return md


def autogenerate(engine: sa.Engine, md: sa.MetaData) -> tuple[float, int, int]:
    statements = 0

    def count(*args: Any) -> None:
        nonlocal statements
        statements += 1

    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", count)
        context = MigrationContext.configure(conn, opts={"target_metadata": md})
        start = time.perf_counter()
        script = produce_migrations(context, md)
        elapsed = time.perf_counter() - start
        conn.rollback()
    assert script.upgrade_ops is not None
    return elapsed, statements, len(script.upgrade_ops.ops)


def measure(
    engine: sa.Engine, build: Callable[[int], sa.MetaData], n: int, repeat: int
) -> tuple[float, int, int]:
    runs = [autogenerate(engine, build(n)) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sqlalchemy_matview.alembic.register()
    n = args.views

    with PostgresServer() as server:
        results: dict[tuple[str, str], tuple[float, int, int]] = {}
        for kind, build in (("views", view_models), ("tables", table_models)):
            database = server.create_database()
            engine = sa.create_engine(server.url(database))
            try:
                autogenerate(engine, build(n))  # warm-up: imports, first connection
                results[("empty", kind)] = measure(engine, build, n, args.repeat)
                with engine.begin() as conn:
                    build(n).create_all(conn)
                results[("in sync", kind)] = measure(engine, build, n, args.repeat)
            finally:
                engine.dispose()

    print(f"Alembic autogenerate, {n} materialized views vs {n} tables over one table")
    print(f"(median of {args.repeat}; PostgreSQL started by the benchmark)\n")
    print(f"{'case':<9} {'what':<7} {'time (s)':>9} {'statements':>11} {'ops':>5} {'ratio':>6}")
    for case in ("empty", "in sync"):
        base = results[(case, "tables")][0]
        for kind in ("tables", "views"):
            elapsed, statements, ops = results[(case, kind)]
            ratio = elapsed / base
            print(f"{case:<9} {kind:<7} {elapsed:>9.3f} {statements:>11} {ops:>5} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
