"""The steps of ``matview demo``: the dashboard story, end to end, on real data.

Run through the command (``matview demo``), which passes a rich ``Console``; only the CLI
imports this module, so the library never needs rich. The story:

1. a throwaway PostgreSQL server (or a scratch database on ``--url``'s server);
2. ``events``: a million rows over 90 days, generated server-side;
3. ``mv_dashboard`` declared as a :class:`~sqlalchemy_matview.MaterializedView`, and
   ``mv_dashboard_inc``, the same numbers per UTC day as an incremental view;
4. a real Alembic autogenerate into a temporary migrations folder, printed;
5. ``alembic upgrade head``;
6. the dashboard query timed on the table and on the view;
7. new events arrive: the view is marked stale, the incremental view has one dirty bucket;
8. ``refresh_stale`` refreshes the view concurrently and recomputes the incremental view's
   one bucket; the numbers are fresh;
9. ``matview status``.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from sqlalchemy.engine import URL, Connection, Engine

__all__ = ["DECLARATION", "DemoError", "run"]

#: How many times each dashboard query is timed; the median is reported.
TIMING_RUNS = 5
DAYS = 90
NEW_EVENTS = 5_000

#: The models of the demo, shown to the user and executed as shown.
DECLARATION = """\
import sqlalchemy as sa
from sqlalchemy_matview import Incremental, MaterializedView

metadata = sa.MetaData()

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),   # view / click / purchase
    sa.Column("amount", sa.Numeric(10, 2)),             # set on purchases
)

day = sa.cast(sa.func.date_trunc("day", events.c.created_at), sa.Date)
mv_dashboard = MaterializedView(
    "mv_dashboard", metadata,
    sa.select(
        day.label("day"),
        sa.func.count().label("events"),
        sa.func.count(events.c.user_id.distinct()).label("unique_users"),
        sa.func.coalesce(
            sa.func.sum(events.c.amount).filter(events.c.kind == "purchase"), 0
        ).label("revenue"),
    ).group_by(day),
    unique_key="day",       # a unique index: REFRESH ... CONCURRENTLY is possible
    track_changes=True,     # triggers on events mark the view stale
)

# The same numbers per UTC day, refreshed by recomputing only the days that changed.
utc_day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)  # IMMUTABLE
sa.Index("ix_events_utc_day", utc_day)  # recomputing a day reads only that day's rows
mv_dashboard_inc = MaterializedView(
    "mv_dashboard_inc", metadata,
    sa.select(
        utc_day.label("day"),
        sa.func.count().label("events"),
        sa.func.count(events.c.user_id.distinct()).label("unique_users"),
        sa.func.coalesce(
            sa.func.sum(events.c.amount).filter(events.c.kind == "purchase"), 0
        ).label("revenue"),
    ).group_by(utc_day),
    incremental=Incremental(key="day", sources={events: utc_day}),
)
"""

_ENV_PY = '''\
"""Alembic environment of the matview demo: the usual online env.py, plus one line."""
from alembic import context

import sqlalchemy_matview.alembic

sqlalchemy_matview.alembic.register()   # the one line that teaches autogenerate about views

config = context.config
target_metadata = config.attributes["target_metadata"]
connection = config.attributes["connection"]

context.configure(connection=connection, target_metadata=target_metadata)
with context.begin_transaction():
    context.run_migrations()
'''

# Values are bind parameters; the generation happens entirely in the server.
_LOAD_EVENTS = sa.text(
    """
    INSERT INTO events (created_at, user_id, kind, amount)
    SELECT date_trunc('day', now()) - make_interval(days => :days - 1)
               + random() * make_interval(days => :days),
           (random() * 50000)::int,
           CASE WHEN r < 0.05 THEN 'purchase' WHEN r < 0.35 THEN 'click' ELSE 'view' END,
           CASE WHEN r < 0.05 THEN round((5 + random() * 95)::numeric, 2) END
      FROM (SELECT random() AS r FROM generate_series(1, :rows)) AS g
    """
)

_NEW_EVENTS = sa.text(
    """
    INSERT INTO events (created_at, user_id, kind, amount)
    SELECT now(), 50000 + i % 2000,
           CASE WHEN i % 5 = 0 THEN 'purchase' ELSE 'view' END,
           CASE WHEN i % 5 = 0 THEN 42.00 END
      FROM generate_series(1, :rows) AS i
    """
)


class DemoError(RuntimeError):
    """The demo could not run (no server binaries, no right to create a database...)."""


class _Steps:
    """Numbered, timed step headings."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.number = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.number += 1
        self.console.print()
        self.console.rule(f"[bold]Step {self.number}/{self.total} · {title}", align="left")
        start = time.perf_counter()
        yield
        self.console.print(f"[dim]step took {time.perf_counter() - start:.2f} s[/]")


def run(console: Console, *, url: URL | None = None, rows: int = 1_000_000) -> None:
    """Run the whole demo, printing every labelled step on ``console``.

    With ``url``, a scratch database is created on that server and dropped afterwards;
    without, a throwaway server is started with
    :class:`~sqlalchemy_matview.testing.launcher.PostgresServer` and removed afterwards.
    Raises :class:`DemoError` when no server can be had.
    """
    started = time.perf_counter()
    steps = _Steps(console, total=9)
    with contextlib.ExitStack() as stack:
        with steps.step("A PostgreSQL server to play with"):
            db_url = stack.enter_context(_database(console, url))
        engine = sa.create_engine(db_url)
        stack.callback(engine.dispose)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="matview-demo-")))
        _story(console, steps, engine, workdir, rows)
    console.print()
    console.print(
        f"[bold green]Done[/] in {time.perf_counter() - started:.1f} s; the demo database and "
        "the migrations folder are gone. Next: `matview --help`, and the quick start in the "
        "documentation.",
        highlight=False,
    )


@contextlib.contextmanager
def _database(console: Console, url: URL | None) -> Iterator[URL]:
    if url is not None:
        yield from _scratch_database(console, url)
        return
    from .testing.launcher import PostgresLaunchError, PostgresServer

    try:
        server = PostgresServer()
    except PostgresLaunchError as exc:
        raise DemoError(
            f"cannot start a throwaway PostgreSQL: {str(exc).splitlines()[0]}; install the "
            "'embedded' extra (pip install '.[embedded]' in the repository's checkout) or "
            "pass --url"
        ) from exc
    console.print(f"Starting a throwaway {server.installation} ...", highlight=False)
    try:
        server.start()
    except PostgresLaunchError as exc:
        server.cleanup()
        raise DemoError(f"cannot start a throwaway PostgreSQL: {exc}") from exc
    try:
        name = server.create_database("matview_demo")
        console.print(
            f"Listening on 127.0.0.1:{server.port}; its data directory is removed at the end.",
            highlight=False,
        )
        yield server.url(name)
    finally:
        server.cleanup()


def _scratch_database(console: Console, url: URL) -> Iterator[URL]:
    name = f"matview_demo_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    quoted = admin.dialect.identifier_preparer.quote(name)
    where = url.render_as_string(hide_password=True)
    try:
        with admin.connect() as conn:
            try:
                conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
            except sa.exc.ProgrammingError as exc:
                raise DemoError(
                    f"the demo needs to create a scratch database on {where} and may not "
                    f"({str(exc.orig).strip()}); grant CREATEDB, or run `matview demo` without "
                    "--url to get a throwaway server"
                ) from exc
        console.print(
            f"Using a scratch database {name!r} on the server of {where} (dropped at the end).",
            highlight=False,
        )
        try:
            yield url.set(database=name)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        admin.dispose()


def _story(console: Console, steps: _Steps, engine: Engine, workdir: Path, rows: int) -> None:
    from . import refresh_stale
    from .cli import collect_status, format_result, render_status

    with engine.connect() as conn:
        version = conn.scalar(sa.text("SHOW server_version"))
    console.print(f"Connected to PostgreSQL {version}.", highlight=False)

    with steps.step("Declare the models: a table and a materialized view over it"):
        console.print(
            Syntax(
                DECLARATION, "python", theme="ansi_dark", background_color="default", word_wrap=True
            )
        )
        namespace: dict[str, Any] = {}
        exec(compile(DECLARATION, "<matview demo models>", "exec"), namespace)
        metadata: sa.MetaData = namespace["metadata"]
        events: sa.Table = namespace["events"]
        view = namespace["mv_dashboard"]
        incremental = namespace["mv_dashboard_inc"]

    with steps.step(f"Create `events` and load {rows:,} rows over {DAYS} days (server-side)"):
        events.create(engine)  # and its index on the UTC day
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT setseed(0.42)"))
            conn.execute(_LOAD_EVENTS, {"days": DAYS, "rows": rows})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE events"))
        console.print(
            f"Loaded {rows:,} events in {time.perf_counter() - start:.1f} s with one "
            "INSERT ... SELECT FROM generate_series(...).",
            highlight=False,
        )

    with steps.step("Alembic autogenerate, into a temporary migrations folder"):
        config = _alembic_project(workdir, metadata)
        script = _alembic(config, engine, "revision", message="dashboard view", autogenerate=True)
        path = Path(script.path)
        console.print(
            f"env.py calls [bold]sqlalchemy_matview.alembic.register()[/]; "
            f"`alembic revision --autogenerate` wrote {path.name}:",
            highlight=False,
        )
        console.print(
            Syntax(
                _abridged(path.read_text()),
                "python",
                theme="ansi_dark",
                background_color="default",
                word_wrap=True,
            )
        )

    with steps.step("alembic upgrade head"):
        _alembic(config, engine, "upgrade", "head")
        with engine.connect() as conn:
            count = conn.scalar(sa.select(sa.func.count()).select_from(view.table))
            inc_count = conn.scalar(sa.select(sa.func.count()).select_from(incremental.table))
        console.print(f"mv_dashboard exists, populated with {count} rows (one per day).")
        console.print(
            f"mv_dashboard_inc exists (a table, with triggers on events), filled with "
            f"{inc_count} rows (one per UTC day)."
        )

    with steps.step(f"The dashboard query: base table vs the view (median of {TIMING_RUNS})"):
        on_table = view.definition.order_by(sa.text("day"))
        on_view = sa.select(view.table).order_by(view.c.day)
        with engine.connect() as conn:
            conn.execute(on_table).all()  # warm the cache for both, fairly
            conn.execute(on_view).all()
            t_table = _median_seconds(conn, on_table, TIMING_RUNS)
            t_view = _median_seconds(conn, on_view, TIMING_RUNS)
            latest = conn.execute(on_view.order_by(None).order_by(view.c.day.desc()).limit(3))
            _print_rows(console, "Latest days, from mv_dashboard", latest.all())
        timing = Table(show_header=True)
        timing.add_column("dashboard query")
        timing.add_column("median", justify="right")
        timing.add_row(f"GROUP BY over {rows:,} events", _ms(t_table))
        timing.add_row("SELECT * FROM mv_dashboard", _ms(t_view))
        console.print(timing)
        console.print(
            f"[bold]The view answers {t_table / t_view:,.0f}x faster.[/]", highlight=False
        )

    today = sa.cast(sa.func.date_trunc("day", sa.func.now()), sa.Date)
    utc_today = sa.cast(sa.func.timezone("UTC", sa.func.now()), sa.Date)
    with steps.step(f"{NEW_EVENTS:,} new events arrive; the views fall behind"):
        with engine.connect() as conn:
            before = conn.execute(sa.select(view.table).where(view.c.day == today)).one()
        with engine.begin() as conn:
            conn.execute(_NEW_EVENTS, {"rows": NEW_EVENTS})
        with engine.connect() as conn:
            still = conn.execute(sa.select(view.table).where(view.c.day == today)).one()
            live = conn.execute(
                view.definition.where(sa.cast(events.c.created_at, sa.Date) == today)
            ).one()
            state = _state(conn, view)
        _print_rows(console, "Today, in the view (unchanged: it is a snapshot)", [still])
        _print_rows(console, "Today, computed from events", [live])
        if state is None or not state.stale:
            raise DemoError("mv_dashboard was not marked stale by its change-tracking triggers")
        console.print(
            f"Change tracking: mv_dashboard [yellow]stale since {state.stale_since:%H:%M:%S}[/] "
            "(statement-level triggers on events marked it and sent a NOTIFY).",
            highlight=False,
        )
        dirty = _dirty(engine, incremental)
        if dirty != 1:
            raise DemoError(f"mv_dashboard_inc should have 1 dirty bucket, it has {dirty}")
        console.print(
            "Incremental: mv_dashboard_inc has [yellow]1 dirty bucket[/] (today, UTC): its "
            "triggers logged the day each new row belongs to.",
            highlight=False,
        )

    with steps.step("refresh_stale(engine, metadata, concurrently=True)"):
        results = refresh_stale(engine, metadata, concurrently=True)
        for result in results:
            console.print(format_result(result), highlight=False)
        done = {r.view.rsplit(".", 1)[-1]: r for r in results if r.status == "refreshed"}
        if set(done) != {"mv_dashboard", "mv_dashboard_inc"}:
            raise DemoError(f"refresh_stale did not refresh both views: {results!r}")
        with engine.connect() as conn:
            after = conn.execute(sa.select(view.table).where(view.c.day == today)).one()
            inc_after = conn.execute(
                sa.select(incremental.table).where(incremental.c.day == utc_today)
            ).one()
        _print_rows(console, "Today, in the view (before → after)", [before, after])
        _print_rows(console, "Today (UTC), in the incremental view", [inc_after])
        full, inc = done["mv_dashboard"].duration, done["mv_dashboard_inc"].duration
        console.print(
            f"events {before.events:,} → {after.events:,}, revenue {before.revenue:,} → "
            f"{after.revenue:,}; readers were never blocked (CONCURRENTLY). The incremental "
            f"view recomputed one day in {_ms(inc)} where CONCURRENTLY recomputed all "
            f"{DAYS} in {_ms(full)}.",
            highlight=False,
        )

    with steps.step("matview status"):
        console.print("[dim]$ matview status[/]")
        with engine.connect() as conn:
            render_status(collect_status(conn, metadata), console)


def _alembic_project(workdir: Path, metadata: sa.MetaData) -> Any:
    import alembic
    from alembic.config import Config

    migrations = workdir / "migrations"
    (migrations / "versions").mkdir(parents=True)
    (migrations / "env.py").write_text(_ENV_PY)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    (migrations / "script.py.mako").write_text(template.read_text())
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(migrations))
    config.attributes["target_metadata"] = metadata
    return config


def _alembic(config: Any, engine: Engine, name: str, *args: Any, **kwargs: Any) -> Any:
    from alembic import command

    with engine.begin() as conn, contextlib.redirect_stdout(io.StringIO()):
        config.attributes["connection"] = conn
        return getattr(command, name)(config, *args, **kwargs)


def _dirty(engine: Engine, view: Any) -> int:
    from .bookkeeping import tracking_schema
    from .orchestration.dirty import dirty_buckets

    with engine.connect() as conn:
        schema = view.schema or conn.scalar(sa.text("SELECT current_schema()"))
        found = dirty_buckets(conn, [(schema, view.name)], tracking_schema(view.metadata))
    state = found.get((schema, view.name))
    return state.count if state is not None else -1


def _abridged(migration: str) -> str:
    """The migration with each incremental view's SQL statements summarised: they are the
    statements ``create_all`` runs (table, log, trigger functions, triggers, refresh
    function, fill), a few hundred lines that would hide the rest of the story."""
    lines = migration.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        stripped = line.lstrip()
        if stripped.startswith(("op.create_incremental_view(", "op.drop_incremental_view(")):
            indent = line[: len(line) - len(stripped)]
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == f"{indent})"), None)
            if end is not None:
                out.append(f"{indent}    {lines[i + 1].strip()}")
                out.append(
                    f"{indent}    # ... {end - i - 2} lines of SQL: the view's table, its "
                    "dirty-bucket log, triggers on events, refresh function, fill ..."
                )
                out.append(lines[end])
                i = end
        i += 1
    return "\n".join(out) + "\n"


def _state(conn: Connection, view: Any) -> Any:
    from . import catalog
    from .orchestration.tracking import view_states

    schema = view.schema or catalog.current_schema(conn)
    return view_states(conn).get((schema, view.name))


def _median_seconds(conn: Connection, statement: Any, runs: int) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        conn.execute(statement).all()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _print_rows(console: Console, title: str, rows: Sequence[Any]) -> None:
    table = Table(title=title, title_justify="left")
    for name in ("day", "events", "unique_users", "revenue"):
        table.add_column(name, justify="left" if name == "day" else "right")
    for row in rows:
        table.add_row(str(row.day), f"{row.events:,}", f"{row.unique_users:,}", f"{row.revenue:,}")
    console.print(table)
