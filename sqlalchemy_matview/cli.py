"""The ``matview`` command: see, refresh and watch materialized views, and run the demo.

Installed as a console script with the ``cli`` extra::

    $ pip install '/path/to/sqlalchemy-matview[cli]'   # a checkout of the repository
    $ export DATABASE_URL=postgresql://app@db.example/app
    $ matview status
    $ matview refresh mv_dashboard --concurrently always
    $ matview refresh --stale --metadata myapp.models:Base.metadata
    $ matview watch --metadata myapp.models:Base.metadata --debounce 5
    $ matview demo            # a throwaway server, a million rows, the whole story

Every command takes ``--url`` (default ``$DATABASE_URL``); a plain ``postgresql://`` URL
uses psycopg 3. Bad input (an unknown view, an unreachable server, a malformed URL, a bad
``--metadata`` path) ends with a one-line message and exit status 2 (usage) or 1 (the rest);
``refresh`` exits 1 when any view failed.

click and rich are imported here only, so the library itself never needs them.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import URL, Connection, Engine, make_url

from . import __version__, catalog
from .bookkeeping import tracking_schema
from .errors import MaterializedViewError
from .schema import MaterializedView, materialized_views

if TYPE_CHECKING:
    from .orchestration import RefreshResult

__all__ = [
    "ViewStatus",
    "collect_status",
    "connect_url",
    "load_metadata",
    "main",
    "render_status",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Environment variable read when ``--url`` is not given.
URL_ENV = "DATABASE_URL"

_ASYNC_DRIVERS = {"asyncpg", "psycopg_async", "psycopg2cffi"}
_LOGGER = "sqlalchemy_matview"


# -- input -------------------------------------------------------------------------------


class CommandError(click.ClickException):
    """A one-line failure: printed as ``Error: <message>``, exit status 1."""


class InputError(CommandError):
    """Bad input found before anything ran: one line, exit status 2 (as for usage errors)."""

    exit_code = 2


class _BadSeconds(click.BadParameter):
    # One line, like every other error of the command, not click's usage block.
    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file or sys.stderr)


def connect_url(raw: str) -> URL:
    """Parse a database URL as the command accepts it.

    ``postgresql://`` and ``postgres://`` mean psycopg 3; async drivers are swapped for
    psycopg too, since the command works synchronously.

    >>> connect_url("postgresql://app@localhost/app").render_as_string()
    'postgresql+psycopg://app@localhost/app'
    """
    text = raw.strip()
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    try:
        url = make_url(text)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise CommandError(
            f"malformed database URL {_hide(raw)!r}: expected "
            "postgresql://user:password@host:port/database"
        ) from exc
    backend, _, driver = url.drivername.partition("+")
    if backend != "postgresql":
        raise CommandError(
            f"matview works with PostgreSQL only, and {_hide(raw)!r} is a {backend!r} URL"
        )
    if not driver or driver in _ASYNC_DRIVERS:
        url = url.set(drivername="postgresql+psycopg")
    if not url.database:
        raise CommandError(f"the database URL {_hide(raw)!r} names no database")
    _require_driver(url, raw)
    return url


def _require_driver(url: URL, raw: str) -> None:
    """Fail with one line when the URL's driver is unknown or not installed."""
    driver = url.get_driver_name()
    try:
        url.get_dialect().import_dbapi()
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise InputError(
            f"the database URL {_hide(raw)!r} asks for the driver {driver!r}, which is not "
            "installed: install it, or use postgresql:// (psycopg 3, installed with the cli "
            "extra)"
        ) from exc


def _hide(raw: str) -> str:
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except Exception:  # a malformed URL may still hold a password: cut after the scheme
        return raw.split("://", 1)[0] + "://..." if "://" in raw else raw


def create_engine(url: URL) -> Engine:
    """A sync engine that gives up on an unreachable server after a few seconds."""
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5
    return sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)


def load_metadata(path: str) -> sa.MetaData:
    """Import ``module:attribute`` and return the ``MetaData`` it names.

    The attribute may be dotted (``models:Base.metadata``) and may name a ``MetaData``, a
    declarative base (its ``.metadata`` is used) or a ``MaterializedView``. The current
    directory is importable, as with ``python -m``.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise CommandError(
            f"--metadata {path!r} must be module:attribute, e.g. myapp.models:Base.metadata"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"--metadata {path!r}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise CommandError(
            f"--metadata {path!r}: importing {module_name!r} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise CommandError(
                f"--metadata {path!r}: {module_name!r} has no attribute {attribute!r}"
            ) from exc
    if isinstance(obj, MaterializedView) or (
        not isinstance(obj, sa.MetaData) and isinstance(getattr(obj, "metadata", None), sa.MetaData)
    ):
        obj = obj.metadata
    if not isinstance(obj, sa.MetaData):
        raise CommandError(
            f"--metadata {path!r} is a {type(obj).__name__}, not a sqlalchemy MetaData "
            "(or a declarative base that has one)"
        )
    return obj


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


@contextmanager
def _errors(url: URL | None = None) -> Iterator[None]:
    """Turn expected failures into one-line messages instead of tracebacks."""
    try:
        yield
    except click.ClickException:
        raise
    except MaterializedViewError as exc:
        raise CommandError(str(exc)) from exc
    except sa.exc.OperationalError as exc:
        where = url.render_as_string(hide_password=True) if url is not None else "the server"
        if exc.connection_invalidated or "connect" in str(exc).lower():
            raise CommandError(f"cannot connect to {where}: {_first_line(exc)}") from exc
        raise CommandError(f"{where}: {_first_line(exc)}") from exc
    except sa.exc.DBAPIError as exc:
        raise CommandError(_first_line(exc)) from exc


def _common(func: F) -> F:
    """``--url`` and ``--metadata``, shared by every command that talks to a database."""
    func = click.option(
        "--metadata",
        "metadata_path",
        metavar="MODULE:ATTR",
        help="Declared views to load, e.g. myapp.models:Base.metadata.",
    )(func)
    func = click.option(
        "--url",
        envvar=URL_ENV,
        show_envvar=True,
        metavar="URL",
        help="Database URL (postgresql:// uses psycopg 3).",
    )(func)
    return func


def _require_url(raw: str | None) -> URL:
    if not raw:
        raise click.UsageError(f"no database: pass --url or set ${URL_ENV}")
    return connect_url(raw)


if TYPE_CHECKING:  # generic in click 8.2+, not at run time in older releases
    _FloatParam = click.ParamType[float]
else:
    _FloatParam = click.ParamType


class Seconds(_FloatParam):
    """A duration in seconds: a finite number, zero or more (``nan`` and ``inf`` are not).

    Click names the flag in the message (``Invalid value for '--lock-timeout'``) and exits
    with status 2, before anything connects.
    """

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise _BadSeconds(f"{value!r} is not a number of seconds", ctx, param) from None
        if not math.isfinite(number) or number < 0:
            raise _BadSeconds(
                f"{value!r} must be a finite number of seconds, 0 or more", ctx, param
            )
        return number


SECONDS = Seconds()


def make_console(*, stderr: bool = False) -> Console:
    """A rich console; wide when output goes to a pipe or file, where no one can resize it."""
    stream = sys.stderr if stderr else sys.stdout
    isatty = getattr(stream, "isatty", lambda: False)()
    width = None if isatty or "COLUMNS" in os.environ else 160
    return Console(stderr=stderr, width=width)


# -- status ------------------------------------------------------------------------------


@dataclasses.dataclass
class ViewStatus:
    """One row of ``matview status``: what the catalog and the change tracking say."""

    schema: str
    name: str
    exists: bool = True
    populated: bool | None = None
    row_estimate: int | None = None
    size_bytes: int | None = None
    concurrent_index: str | None = None
    depends_on: list[str] = dataclasses.field(default_factory=list)
    #: ``"managed"``, ``"unmanaged"`` or ``"undeclared"``; ``None`` without ``--metadata``.
    declared: str | None = None
    tracked: bool = False
    stale: bool | None = None
    stale_since: datetime.datetime | None = None
    #: Change marks not covered by a refresh yet (counted up to a cap; not transactions).
    pending_changes: int | None = None
    #: Why the change tracking of a declared ``track_changes=True`` view is broken.
    tracking_problems: list[str] = dataclasses.field(default_factory=list)
    last_refreshed_at: datetime.datetime | None = None
    last_duration: float | None = None
    #: The declared freshness objective in seconds (``max_staleness``), if any.
    max_staleness: float | None = None
    #: Whether the view is older than its objective (``None`` without one).
    breached: bool | None = None
    #: An incremental view (a table whose dirty buckets a refresh recomputes).
    incremental: bool = False
    #: Its dirty buckets, counted up to a cap (``None`` for other views).
    dirty_buckets: int | None = None
    #: More dirty buckets than counted.
    dirty_capped: bool = False
    #: A source was truncated since its last refresh: the next one recomputes everything.
    truncated: bool = False

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["view"] = self.qualified_name
        data["concurrent_capable"] = self.concurrent_index is not None if self.exists else None
        for key in ("stale_since", "last_refreshed_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _view_states(conn: Connection, metadata: sa.MetaData | None) -> dict[tuple[str, str], Any]:
    try:
        from .orchestration.tracking import view_states
    except ImportError:
        return {}
    # A database without the state table must not abort the caller's transaction.
    with conn.begin_nested() as savepoint:
        try:
            states: dict[tuple[str, str], Any] = dict(view_states(conn, tracking_schema(metadata)))
        except sa.exc.ProgrammingError:
            savepoint.rollback()
            return {}
    return states


def collect_status(
    conn: Connection, metadata: sa.MetaData | None = None, schemas: Sequence[str] | None = None
) -> list[ViewStatus]:
    """The rows ``matview status`` shows, from a fixed number of catalog queries.

    With ``metadata``, declared views missing from the database are listed too, and each
    row says whether the view is declared and managed.
    """
    infos = catalog.materialized_views(conn, schemas, definitions=False)
    deps: dict[tuple[str, str], list[str]] = {}
    for dep in catalog.dependencies(conn):
        deps.setdefault(dep.dependent, []).append(".".join(dep.referenced))
    states = _view_states(conn, metadata)
    current = catalog.current_schema(conn)
    declared: dict[tuple[str, str], MaterializedView] = {}
    if metadata is not None:
        for view in materialized_views(metadata):
            declared[(view.schema or current, view.name)] = view

    rows: list[ViewStatus] = []
    for info in infos:
        key = info.qualified_name
        row = ViewStatus(
            schema=info.schema,
            name=info.name,
            populated=info.populated,
            row_estimate=info.row_estimate if info.row_estimate >= 0 else None,
            size_bytes=info.size_bytes,
            concurrent_index=info.concurrent_index,
            depends_on=sorted(deps.get(key, [])),
        )
        if metadata is not None:
            found = declared.get(key)
            row.declared = (
                "undeclared" if found is None else ("managed" if found.managed else "unmanaged")
            )
        _apply_state(row, states.get(key))
        rows.append(row)
    rows += _incremental_rows(conn, metadata, schemas, declared, states)
    present_keys = {(r.schema, r.name) for r in rows}
    for key, view in declared.items():
        if key in present_keys or (schemas is not None and key[0] not in schemas):
            continue
        row = ViewStatus(
            schema=key[0],
            name=key[1],
            exists=False,
            declared="managed" if view.managed else "unmanaged",
        )
        _apply_state(row, states.get(key))
        rows.append(row)
    if metadata is not None:
        by_name = {r.qualified_name: r for r in rows}
        for problem in _tracking_problems(conn, metadata):
            if problem.view in by_name:
                by_name[problem.view].tracking_problems.append(problem.problem)
        for report in _freshness(conn, metadata):
            if report.max_staleness is not None and report.view in by_name:
                by_name[report.view].max_staleness = report.max_staleness.total_seconds()
                by_name[report.view].breached = report.breached
    rows.sort(key=lambda r: (r.schema, r.name))
    return rows


_TABLE_SIZES = sa.text(
    """
    SELECT c.reltuples::bigint AS row_estimate, pg_catalog.pg_total_relation_size(c.oid) AS size
      FROM pg_catalog.pg_class c
     WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(:name)
    """
)


def _incremental_rows(
    conn: Connection,
    metadata: sa.MetaData | None,
    schemas: Sequence[str] | None,
    declared: dict[tuple[str, str], MaterializedView],
    states: dict[tuple[str, str], Any],
) -> list[ViewStatus]:
    """Incremental views: tables (not in ``pg_matviews``) with a dirty-bucket log."""
    from .orchestration.dirty import dirty_buckets
    from .orchestration.tracking import bookkeeping_inventory

    bk = tracking_schema(metadata)
    with conn.begin_nested() as savepoint:
        try:
            # Only a bookkeeping schema of trusted roles says which tables are incremental.
            if not bookkeeping_inventory(conn, bk).exists:
                return []
            found = catalog.installed_incremental(conn, bk, schemas)
            dirty = dirty_buckets(conn, found, bk)
        except sa.exc.DBAPIError:
            savepoint.rollback()
            return []
    preparer = conn.dialect.identifier_preparer
    rows = []
    for key in found:
        size = conn.execute(
            _TABLE_SIZES, {"name": f"{preparer.quote_schema(key[0])}.{preparer.quote(key[1])}"}
        ).one()
        row = ViewStatus(
            schema=key[0],
            name=key[1],
            populated=True,
            row_estimate=int(size.row_estimate) if size.row_estimate >= 0 else None,
            size_bytes=int(size.size),
            incremental=True,
        )
        if metadata is not None:
            view = declared.get(key)
            row.declared = (
                "undeclared" if view is None else ("managed" if view.managed else "unmanaged")
            )
            if view is not None and view.incremental is not None:
                current = catalog.current_schema(conn)
                row.depends_on = sorted(
                    f"{t.schema or current}.{t.name}" for t in view.incremental.sources
                )
        _apply_state(row, states.get(key))
        logged = dirty.get(key)
        row.tracked = True
        if logged is not None:
            row.stale = logged.dirty
            row.dirty_buckets = logged.count
            row.dirty_capped = logged.capped
            row.truncated = logged.truncated
        rows.append(row)
    return rows


def _read_or_nothing(
    conn: Connection, metadata: sa.MetaData, read: Callable[[Connection, sa.MetaData], list[Any]]
) -> list[Any]:
    """``read(conn, metadata)``, or nothing when the database refuses it: read-only, but a
    failure must not abort the caller's transaction either (a savepoint around it)."""
    with conn.begin_nested() as savepoint:
        try:
            return read(conn, metadata)
        except sa.exc.DBAPIError:
            savepoint.rollback()
            return []


def _freshness(conn: Connection, metadata: sa.MetaData) -> list[Any]:
    from .orchestration import freshness

    return _read_or_nothing(conn, metadata, freshness)


def _tracking_problems(conn: Connection, metadata: sa.MetaData) -> list[Any]:
    from .orchestration.tracking import check_tracking

    return _read_or_nothing(conn, metadata, check_tracking)


def _apply_state(row: ViewStatus, state: Any) -> None:
    if state is None:
        return
    row.tracked = bool(getattr(state, "tracked", True))
    row.stale = bool(getattr(state, "stale", False)) if row.tracked else None
    row.stale_since = getattr(state, "stale_since", None)
    row.pending_changes = getattr(state, "pending_changes", None) if row.tracked else None
    row.last_refreshed_at = getattr(state, "last_refreshed_at", None)
    row.last_duration = _seconds(getattr(state, "last_duration", None))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _ago(when: datetime.datetime | None, now: datetime.datetime) -> str:
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 60:
        text = f"{seconds:.0f}s ago"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f}min ago"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f}h ago"
    else:
        text = f"{seconds / 86400:.1f}d ago"
    return f"{when.astimezone():%Y-%m-%d %H:%M:%S} ({text})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# view_states() counts pending changes up to this many (a status never scans the log).
_PENDING_CAP = 1000


def _dirty_cell(row: ViewStatus) -> str:
    if row.truncated:
        return "[yellow]truncated: full recompute next[/]"
    if not row.dirty_buckets:
        return "[green]fresh[/]"
    more = "+" if row.dirty_capped else ""
    plural = "" if row.dirty_buckets == 1 and not more else "s"
    return f"[yellow]{row.dirty_buckets:,}{more} dirty bucket{plural}[/]"


def render_status(rows: Sequence[ViewStatus], console: Console) -> None:
    """Print ``rows`` as the table ``matview status`` shows."""
    if not rows:
        console.print("No materialized views.")
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    tracked = any(r.tracked or r.last_refreshed_at is not None or r.tracking_problems for r in rows)
    declared = any(r.declared is not None for r in rows)
    objectives = any(r.max_staleness is not None for r in rows)
    table = Table(title="Materialized views", title_justify="left")
    # Names wrap rather than end in an ellipsis: an operator copies them into commands.
    table.add_column("view", overflow="fold")
    table.add_column("populated")
    table.add_column("rows", justify="right")
    table.add_column("size", justify="right")
    table.add_column("concurrent")
    table.add_column("depends on", overflow="fold")
    if declared:
        table.add_column("declared")
    if tracked:
        table.add_column("stale since")
        table.add_column("last refreshed")
        table.add_column("last duration", justify="right")
    if objectives:
        table.add_column("objective")
    for row in rows:
        if not row.exists:
            cells = ["[red]missing[/]", "-", "-", "-", "-"]
        else:
            cells = [
                "yes" if row.populated else "[yellow]no[/]",
                f"~{row.row_estimate:,}" if row.row_estimate is not None else "?",
                _size(row.size_bytes),
                "incremental"
                if row.incremental
                else (row.concurrent_index and f"yes ({row.concurrent_index})") or "no",
                ", ".join(row.depends_on) or "-",
            ]
        line = [row.qualified_name, *cells]
        if declared:
            line.append(row.declared or "-")
        if tracked:
            if row.incremental:
                stale = _dirty_cell(row)
            elif row.tracking_problems:
                stale = "[red]tracking broken[/]"
            elif not row.tracked:
                stale = "[dim]not tracked[/]"
            elif row.stale:
                pending = row.pending_changes or 0
                more = "+" if pending >= _PENDING_CAP else ""
                stale = f"[yellow]{_ago(row.stale_since, now)} ({pending:,}{more} pending)[/]"
            else:
                stale = "[green]fresh[/]"
            line += [stale, _ago(row.last_refreshed_at, now), _duration(row.last_duration)]
        if objectives:
            if row.max_staleness is None:
                line.append("-")
            else:
                span = _span(datetime.timedelta(seconds=row.max_staleness))
                line.append(f"[red]BREACHED ({span})[/]" if row.breached else f"met ({span})")
        table.add_row(*line)
    console.print(table)
    for row in rows:
        for problem in row.tracking_problems:
            console.print(
                f"[red]error:[/] change tracking of {row.qualified_name}: {problem}",
                highlight=False,
            )


# -- refresh -----------------------------------------------------------------------------


def _resolve(
    conn: Connection, names: Sequence[str], metadata: sa.MetaData | None
) -> list[MaterializedView | tuple[str, str]]:
    """Map command-line names to what ``refresh_views`` takes, or fail listing the known ones."""
    infos = catalog.materialized_views(conn, definitions=False)
    current = catalog.current_schema(conn)
    known = {info.qualified_name for info in infos}
    declared: dict[tuple[str, str], MaterializedView] = {}
    if metadata is not None:
        for view in materialized_views(metadata):
            declared[(view.schema or current, view.name)] = view
    targets: list[MaterializedView | tuple[str, str]] = []
    for raw in names:
        schema, dot, name = raw.rpartition(".")
        if dot:
            candidates = [(schema, name)] if (schema, name) in known else []
        else:
            candidates = sorted(k for k in known if k[1] == raw)
            if len(candidates) > 1:
                preferred = [k for k in candidates if k[0] == current]
                if not preferred:
                    choices = ", ".join(".".join(k) for k in candidates)
                    raise CommandError(f"view {raw!r} is ambiguous: it could be {choices}")
                candidates = preferred
        if not candidates:
            listing = ", ".join(".".join(k) for k in sorted(known)) or "none"
            hint = ""
            key = (schema, name) if dot else (current, raw)
            if key in declared:
                hint = " (it is declared but not created yet: run your migrations)"
            raise CommandError(
                f"unknown materialized view {raw!r}{hint}; the database has: {listing}"
            )
        key = candidates[0]
        match = declared.get(key)
        targets.append(match if match is not None else key)
    return targets


_STATUS_STYLE = {
    "refreshed": ("[green]✓[/]", "refreshed"),
    "skipped_fresh": ("[dim]·[/]", "fresh, skipped"),
    "skipped_locked": ("[yellow]~[/]", "locked elsewhere, skipped"),
    "skipped_dependency_failed": ("[red]-[/]", "skipped: a view it reads failed"),
    "failed": ("[red]✗[/]", "FAILED"),
}


def format_result(result: RefreshResult) -> str:
    """One line for one ``RefreshResult``, as ``refresh`` and ``watch`` print it."""
    mark, label = _STATUS_STYLE.get(result.status, ("?", result.status))
    text = f"{mark} {result.view}  {label}"
    if result.status == "refreshed":
        how = "concurrently" if result.concurrently else "plain"
        buckets = getattr(result, "buckets", None)
        if buckets is not None:
            plural = "" if buckets == 1 else "s"
            how = (
                f"incremental, full recompute of {buckets:,} bucket{plural}"
                if getattr(result, "full_refresh", False)
                else f"incremental, {buckets:,} bucket{plural} recomputed"
            )
        text += f" ({how}) in {_duration(result.duration)}"
    if result.error is not None:
        text += f": {_first_line(result.error)}"
    return text


class _ProgressHandler(logging.Handler):
    """Shows the library's log messages in the progress spinner while a refresh runs."""

    def __init__(self, update: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._update = update

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._update(record.getMessage())
        except Exception:  # a display problem must never break a refresh
            self.handleError(record)


def _without_traceback(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` whose exception is reduced to its first line.

    ``watch`` keeps reconnecting while the server is down; a traceback per attempt buries
    the one line an operator needs (``-v`` keeps them).
    """
    if not record.exc_info or record.exc_info[1] is None:
        return record
    short = copy.copy(record)
    short.msg = f"{record.getMessage()}: {_first_line(record.exc_info[1])}"
    short.args = None
    short.exc_info = None
    short.exc_text = None
    return short


@contextmanager
def _progress(console: Console, message: str) -> Iterator[None]:
    logger = logging.getLogger(_LOGGER)
    with console.status(message) as status:
        handler = _ProgressHandler(lambda text: status.update(f"{message} {text}"))
        old_level = logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


def _print_now(console: Console, text: str) -> None:
    # A long-running command's output goes to logs through pipes: never hold it in a buffer.
    console.print(text, highlight=False)
    console.file.flush()


_LOCKS: dict[str, Literal["skip", "wait", "none"]] = {
    "skip": "skip",
    "wait": "wait",
    "none": "none",
}

_CONCURRENTLY = {"auto": "auto", "always": True, "never": False}


# -- commands ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="matview")
def main() -> None:
    """See, refresh and watch PostgreSQL materialized views (sqlalchemy-matview)."""


@main.command(short_help="Show every materialized view and its state.")
@_common
@click.option("--schema", "schemas", multiple=True, help="Only these schemas (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 when a declared view is missing or its change tracking is broken.",
)
def status(
    url: str | None,
    metadata_path: str | None,
    schemas: tuple[str, ...],
    as_json: bool,
    check: bool,
) -> None:
    """Show every materialized view: populated, rows, size, concurrency, dependencies,
    and, where change tracking is on, staleness, pending changes and the last refresh.
    With --metadata, declared views whose change tracking is broken are shown as errors."""
    db_url = _require_url(url)
    metadata = load_metadata(metadata_path) if metadata_path else None
    engine = create_engine(db_url)
    try:
        with _errors(db_url), engine.connect() as conn:
            rows = collect_status(conn, metadata, list(schemas) or None)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        render_status(rows, make_console())
    if check:
        broken = [r.qualified_name for r in rows if r.tracking_problems]
        missing = [r.qualified_name for r in rows if not r.exists]
        if broken or missing:
            parts = []
            if missing:
                parts.append(f"missing: {', '.join(missing)}")
            if broken:
                parts.append(f"change tracking broken: {', '.join(broken)}")
            raise CommandError("; ".join(parts))


def _span(delta: datetime.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def check_problems(conn: Connection, metadata: sa.MetaData) -> list[str]:
    """One line per problem ``matview check`` reports (empty when all is well)."""
    from .orchestration import check_tracking, freshness, refresh_history

    lines: list[str] = []
    for f in freshness(conn, metadata):
        last = refresh_history(conn, f.view, limit=1, metadata=metadata)
        if last and last[0].status == "failed":
            error = (last[0].error or "").splitlines()[0:1]
            lines.append(
                f"{f.view}: last refresh failed at {last[0].started_at:%Y-%m-%d %H:%M:%S%z}"
                + (f": {error[0]}" if error else "")
            )
        if not f.populated:
            lines.append(
                f"{f.view}: not populated (missing, or created WITH NO DATA): refresh it "
                "(matview refresh) or create it (create_all / the migration)"
            )
        elif f.breached:
            assert f.max_staleness is not None
            if f.staleness is None:
                lines.append(
                    f"{f.view}: age unknown (never refreshed through sqlalchemy-matview), "
                    f"objective {_span(f.max_staleness)}: refresh it once, or run a worker"
                )
            else:
                lines.append(
                    f"{f.view}: {_span(f.staleness)} old, objective {_span(f.max_staleness)}"
                )
    lines += [
        f"{p.view}: change tracking broken: {p.problem}" for p in check_tracking(conn, metadata)
    ]
    return lines


@main.command(short_help="Exit 1 when a view breaches its objective or is broken.")
@_common
def check(url: str | None, metadata_path: str | None) -> None:
    """For cron and monitoring: one line per problem and exit status 1, or exit 0.

    Problems: a view older than its max_staleness objective, a view not populated (or
    missing), broken change tracking. Read-only: it runs on a hot standby too.
    """
    if not metadata_path:
        raise click.UsageError("check needs --metadata MODULE:ATTR (the declared views)")
    db_url = _require_url(url)
    metadata = load_metadata(metadata_path)
    engine = create_engine(db_url)
    try:
        with _errors(db_url), engine.connect() as conn:
            lines = check_problems(conn, metadata)
            count = len(materialized_views(metadata))
    finally:
        engine.dispose()
    for line in lines:
        click.echo(line)
    if lines:
        sys.exit(1)
    click.echo(f"OK: {count} view(s) checked")


@main.command(short_help="The refresh history of a view, or of all.")
@_common
@click.argument("view", required=False, metavar="[VIEW]")
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="How many rows."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def history(
    url: str | None, metadata_path: str | None, view: str | None, limit: int, as_json: bool
) -> None:
    """Newest first: when each refresh started, how long it took, how it ended (refreshed,
    failed, skipped_locked), and the error of a failure. --metadata only names a tracking
    schema that is not the default."""
    from .orchestration import refresh_history

    db_url = _require_url(url)
    metadata = load_metadata(metadata_path) if metadata_path else None
    engine = create_engine(db_url)
    try:
        with _errors(db_url), engine.connect() as conn:
            records = refresh_history(conn, view, limit=limit, metadata=metadata)
    finally:
        engine.dispose()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {**dataclasses.asdict(r), "started_at": r.started_at.isoformat()}
                    for r in records
                ],
                indent=2,
            )
        )
        return
    console = make_console()
    if not records:
        console.print("No refreshes recorded." + (f" (view {view})" if view else ""))
        return
    table = Table(box=None)
    for header in ("view", "started", "took", "status", "concurrently", "rows≈", "error"):
        table.add_column(header, overflow="fold")
    for r in records:
        table.add_row(
            r.view,
            f"{r.started_at.astimezone():%Y-%m-%d %H:%M:%S}",
            _duration(r.duration),
            r.status,
            "-" if r.concurrently is None else ("yes" if r.concurrently else "no"),
            "-" if r.row_estimate is None else f"{r.row_estimate:,}",
            (r.error or "").splitlines()[0] if r.error else "",
        )
    console.print(table)


@main.command(short_help="Refresh views by name, --all, or --stale.")
@_common
@click.argument("views", nargs=-1, metavar="[VIEW]...")
@click.option("--all", "all_", is_flag=True, help="Every materialized view.")
@click.option("--stale", is_flag=True, help="Only views marked stale (needs --metadata).")
@click.option("--cascade", is_flag=True, help="Also refresh the views that depend on them.")
@click.option(
    "--concurrently",
    type=click.Choice(list(_CONCURRENTLY)),
    default="auto",
    show_default=True,
    help="auto: CONCURRENTLY when the view allows it.",
)
@click.option(
    "--lock",
    type=click.Choice(["skip", "wait", "none"]),
    default="skip",
    show_default=True,
    help="Advisory lock: skip views another process refreshes, wait for it, or take none.",
)
@click.option("--lock-timeout", type=SECONDS, metavar="SECONDS", help="Bound lock waits.")
@click.option("--statement-timeout", type=SECONDS, metavar="SECONDS", help="Bound each refresh.")
@click.option(
    "--lock-namespace",
    envvar="MATVIEW_LOCK_NAMESPACE",
    metavar="TEXT",
    help="Salt of the advisory-lock keys (the one your workers use; env MATVIEW_LOCK_NAMESPACE).",
)
def refresh(
    url: str | None,
    metadata_path: str | None,
    views: tuple[str, ...],
    all_: bool,
    stale: bool,
    cascade: bool,
    concurrently: str,
    lock: str,
    lock_timeout: float | None,
    statement_timeout: float | None,
    lock_namespace: str | None,
) -> None:
    """Refresh the named views, --all of them, or the --stale ones.

    One line per view; the exit status is 0 only when nothing failed.
    """
    chosen = [
        what for what, on in (("VIEW names", views), ("--all", all_), ("--stale", stale)) if on
    ]
    if len(chosen) > 1:
        raise click.UsageError(
            f"{' and '.join(chosen)} cannot be combined: name the views to refresh, "
            "or pass --all, or pass --stale"
        )
    if not chosen:
        raise click.UsageError("name views to refresh, or pass exactly one of --all / --stale")
    db_url = _require_url(url)
    metadata = load_metadata(metadata_path) if metadata_path else None
    if stale and metadata is None:
        raise click.UsageError(
            "--stale needs --metadata MODULE:ATTR: staleness is tracked for declared views "
            "with track_changes=True"
        )
    from . import refresh_all, refresh_stale, refresh_views

    options: dict[str, Any] = {
        "cascade": cascade,
        "concurrently": _CONCURRENTLY[concurrently],
        "lock": _LOCKS[lock],
        "lock_timeout": lock_timeout,
        "statement_timeout": statement_timeout,
        "lock_namespace": lock_namespace,
    }
    console = make_console()
    engine = create_engine(db_url)
    try:
        with _errors(db_url):
            if stale:
                assert metadata is not None
                with _progress(console, "Refreshing stale views..."):
                    results = refresh_stale(engine, metadata, **options)
            elif all_ and metadata is not None:
                with _progress(console, "Refreshing every declared view..."):
                    results = refresh_all(engine, metadata, **options)
            else:
                with engine.connect() as conn:
                    if all_:
                        targets: list[MaterializedView | tuple[str, str]] = [
                            info.qualified_name
                            for info in catalog.materialized_views(conn, definitions=False)
                        ]
                    else:
                        targets = _resolve(conn, views, metadata)
                with _progress(console, f"Refreshing {len(targets)} view(s)..."):
                    results = refresh_views(engine, *targets, **options) if targets else []
    finally:
        engine.dispose()
    if not results:
        console.print("Nothing to refresh.")
    for result in results:
        console.print(format_result(result), highlight=False)
    failed = sum(r.status == "failed" for r in results)
    if failed:
        raise CommandError(f"{failed} of {len(results)} refresh(es) failed")


@main.command(short_help="Refresh stale views as their sources change.")
@_common
@click.option(
    "--debounce",
    type=SECONDS,
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Quiet time after a change before refreshing.",
)
@click.option(
    "--max-delay",
    type=SECONDS,
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh at the latest this long after the first change.",
)
@click.option(
    "--interval",
    type=SECONDS,
    default=None,
    metavar="SECONDS",
    help="Also refresh stale views periodically, as a safety net.",
)
@click.option(
    "--lock",
    type=click.Choice(["skip", "wait", "none"]),
    default="skip",
    show_default=True,
    help="Advisory lock policy.",
)
@click.option("--channel", default="sqlalchemy_matview", show_default=True, help="LISTEN channel.")
@click.option(
    "--listen-url",
    envvar="MATVIEW_LISTEN_URL",
    metavar="URL",
    help="LISTEN on this direct connection; --url may then go through a transaction-pooled "
    "PgBouncer (env MATVIEW_LISTEN_URL).",
)
@click.option(
    "--lock-namespace",
    envvar="MATVIEW_LOCK_NAMESPACE",
    metavar="TEXT",
    help="Salt of the advisory-lock keys (the one your other refreshers use; "
    "env MATVIEW_LOCK_NAMESPACE).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Serve Prometheus metrics on http://ADDR:PORT/metrics (needs the 'metrics' extra).",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    metavar="ADDR",
    help="Address the metrics endpoint listens on.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details too.")
def watch(
    url: str | None,
    metadata_path: str | None,
    debounce: float,
    max_delay: float,
    interval: float | None,
    lock: str,
    channel: str,
    listen_url: str | None,
    lock_namespace: str | None,
    metrics_port: int | None,
    metrics_addr: str,
    verbose: bool,
) -> None:
    """Refresh stale views as their sources change, until SIGINT or SIGTERM.

    Listens for the change-tracking notifications of the views declared in --metadata
    (with track_changes=True) and runs refresh_stale after --debounce seconds of quiet.
    """
    if not metadata_path:
        raise click.UsageError("watch needs --metadata MODULE:ATTR (the declared views)")
    db_url = _require_url(url)
    metadata = load_metadata(metadata_path)
    if not any(v.track_changes for v in materialized_views(metadata)):
        raise CommandError(
            f"--metadata {metadata_path!r} declares no view with track_changes=True; "
            "watch has nothing to listen for (use --interval with refresh --all in cron instead)"
        )
    from rich.logging import RichHandler

    from . import RefreshWorker

    console = make_console()

    class Handler(RichHandler):
        def emit(self, record: logging.LogRecord) -> None:
            super().emit(record if verbose else _without_traceback(record))

    handler = Handler(console=make_console(stderr=True), show_path=False)
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    listen = connect_url(listen_url) if listen_url else None
    engine = create_engine(db_url)
    observe = _metrics(engine, metadata, metrics_port, metrics_addr, console)

    def on_result(result: RefreshResult) -> None:
        if verbose or result.status != "skipped_fresh":
            _print_now(console, format_result(result))
        if observe is not None:
            observe(result)

    try:
        with _errors(db_url):
            with engine.connect():  # fail fast, with one line, when the server is unreachable
                pass
            worker = RefreshWorker(
                engine,
                metadata,
                debounce=debounce,
                max_delay=max_delay,
                interval=interval,
                channel=channel,
                lock=_LOCKS[lock],
                lock_namespace=lock_namespace,
                listen_url=listen,
                on_result=on_result,
            )
        # Outside _errors(db_url): a failure here may be about the listen URL.
        with _errors(listen or db_url):
            # A standby or a transaction pooler fails here, before "Watching" is printed.
            worker.check_server()
        with _errors(db_url):
            _print_now(
                console,
                f"Watching {db_url.render_as_string(hide_password=True)} "
                f"(channel {channel!r}); Ctrl-C to stop.",
            )
            worker.run()
    finally:
        logger.removeHandler(handler)
        engine.dispose()
    console.print("Stopped.")


def _metrics(
    engine: sa.Engine,
    metadata: sa.MetaData,
    port: int | None,
    addr: str,
    console: Console,
) -> Callable[[RefreshResult], None] | None:
    """Start the metrics endpoint of ``watch --metrics-port``; its ``observe``, or None."""
    if port is None:
        return None
    try:
        from .metrics import RefreshMetrics, serve_metrics
    except ImportError as exc:
        raise CommandError(
            "--metrics-port needs prometheus_client: pip install 'sqlalchemy-matview[metrics]'"
        ) from exc
    metrics = RefreshMetrics(engine, metadata)
    try:
        server, _thread = serve_metrics(port, addr)
    except OSError as exc:
        raise CommandError(f"--metrics-port {port}: cannot listen on {addr}: {exc}") from exc
    _print_now(console, f"Metrics on http://{addr}:{server.server_port}/metrics")
    return metrics.observe


@main.command(short_help="The dashboard story on a throwaway server.")
@click.option(
    "--url",
    envvar=URL_ENV,
    show_envvar=True,
    metavar="URL",
    help="Use this server (a scratch database is created and dropped) instead of a throwaway one.",
)
@click.option(
    "--rows",
    type=click.IntRange(1000),
    default=1_000_000,
    show_default=True,
    help="How many events to generate.",
)
def demo(url: str | None, rows: int) -> None:
    """The dashboard story, end to end, on a throwaway PostgreSQL server.

    Loads a million events, declares a materialized view, autogenerates and applies its
    Alembic migration, times the dashboard query with and without the view, then changes
    the data and refreshes only what went stale.
    """
    from . import demo as demo_module

    db_url = connect_url(url) if url else None
    with _errors(db_url):
        try:
            demo_module.run(make_console(), url=db_url, rows=rows)
        except demo_module.DemoError as exc:
            raise CommandError(str(exc)) from exc


if __name__ == "__main__":  # pragma: no cover
    main()
