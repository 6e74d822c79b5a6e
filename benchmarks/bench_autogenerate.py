"""Alembic autogenerate with N materialized views, side by side with N plain tables.

Run it on demand (it starts its own throwaway PostgreSQL server)::

    python benchmarks/bench_autogenerate.py [--sizes 10,100,500] [--repeat 5]

For each N and each of two cases -- an empty database (everything must be created) and a
database in sync with the models (nothing to do) -- it times what ``alembic revision
--autogenerate`` does after importing the models: ``produce_migrations`` and rendering the
upgrade and downgrade, for

* ``views``: one table plus N ``MaterializedView`` objects over it, each with a unique key
  and a second index (``DESC``);
* ``tables``: the same table plus N plain tables with the same columns and indexes, compared
  by plain Alembic.

Models are declared before the clock starts, on both sides (declaring a view compiles its
query). The two sides run alternately, ``--repeat`` times each, so that the load of a shared
machine falls on both alike. It prints the median times, the number of SQL statements sent,
the number of operations, and the ratio views/tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
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
        view = MaterializedView(
            f"mv_{i:03d}",
            md,
            sa.select(events.c.kind, sa.func.count().label("n"))
            .where(events.c.id > i)
            .group_by(events.c.kind),
            unique_key="kind",
        )
        sa.Index(f"mv_{i:03d}_n", view.c.n.desc())
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
        sa.Index(f"t_{i:03d}_n", t.c.n.desc())
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
        assert script.upgrade_ops is not None and script.downgrade_ops is not None
        render_python_code(script.upgrade_ops)
        render_python_code(script.downgrade_ops)
        elapsed = time.perf_counter() - start
        conn.rollback()
    return elapsed, statements, len(script.upgrade_ops.ops)


def measure(
    engines: dict[str, sa.Engine], n: int, repeat: int
) -> dict[str, tuple[float, int, int]]:
    """Median time per side; the two sides alternate, so that load on a shared machine falls
    on both alike."""
    builds = {"views": view_models, "tables": table_models}
    runs: dict[str, list[tuple[float, int, int]]] = {kind: [] for kind in engines}
    for _ in range(repeat):
        for kind, engine in engines.items():
            md = builds[kind](n)
            runs[kind].append(autogenerate(engine, md))
    return {
        kind: (statistics.median(r[0] for r in rs), rs[0][1], rs[0][2]) for kind, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500", help="numbers of views, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sqlalchemy_matview.alembic.register()
    sizes = [int(s) for s in args.sizes.split(",")]

    results: dict[tuple[int, str, str], tuple[float, int, int]] = {}
    with PostgresServer() as server:
        version = server.version
        for n in sizes:
            engines = {
                "views": sa.create_engine(server.url(server.create_database())),
                "tables": sa.create_engine(server.url(server.create_database())),
            }
            try:
                for kind, engine in engines.items():
                    # Warm-up: imports, first connection.
                    autogenerate(engine, (view_models if kind == "views" else table_models)(n))
                for kind, timing in measure(engines, n, args.repeat).items():
                    results[(n, "empty", kind)] = timing
                for kind, engine in engines.items():
                    with engine.begin() as conn:
                        (view_models if kind == "views" else table_models)(n).create_all(conn)
                for kind, timing in measure(engines, n, args.repeat).items():
                    results[(n, "in sync", kind)] = timing
            finally:
                for engine in engines.values():
                    engine.dispose()

    import alembic

    print(
        f"Alembic {alembic.__version__}, SQLAlchemy {sa.__version__}, PostgreSQL {version}: "
        f"autogenerate + render, median of {args.repeat}, the two sides alternating"
    )
    header = f"{'N':>4} {'case':<8} {'tables (s)':>10} {'views (s)':>10} {'ratio':>6}"
    print(header + f" {'statements t/v':>15} {'ops':>5}")
    for n in sizes:
        for case in ("empty", "in sync"):
            base, base_statements, _ = results[(n, case, "tables")]
            elapsed, statements, ops = results[(n, case, "views")]
            print(
                f"{n:>4} {case:<8} {base:>10.3f} {elapsed:>10.3f} {elapsed / base:>6.2f}"
                f" {f'{base_statements}/{statements}':>15} {ops:>5}"
            )


if __name__ == "__main__":
    main()
