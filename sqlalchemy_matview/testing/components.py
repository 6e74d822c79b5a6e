"""What production puts around PostgreSQL, for tests: PgBouncer, a streaming hot standby,
and a logical replication publisher/subscriber pair.

All run the real programs (Debian's ``pgbouncer`` package; ``pg_basebackup`` and
``postgres`` of the primary's installation), as the same unprivileged user as the
:class:`~sqlalchemy_matview.testing.launcher.PostgresServer` they serve, on free ports in
temporary directories.

Example::

    import sqlalchemy as sa
    from sqlalchemy_matview.testing.launcher import PostgresServer
    from sqlalchemy_matview.testing.components import PgBouncer, StandbyServer

    with PostgresServer() as primary, PgBouncer(primary) as bouncer:
        engine = sa.create_engine(
            bouncer.url(primary.create_database()), connect_args=PgBouncer.CONNECT_ARGS
        )
        with StandbyServer(primary) as standby:
            ...
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from sqlalchemy.engine import URL

from .launcher import (
    Installation,
    PostgresLaunchError,
    PostgresServer,
    _free_port,
    _run_as_for,
    _RunAs,
    _tail,
    _url_for,
)

__all__ = [
    "PGBOUNCER_ENV",
    "LogicalReplication",
    "PgBouncer",
    "StandbyServer",
    "find_pgbouncer",
]

#: Environment variable naming the ``pgbouncer`` executable to use.
PGBOUNCER_ENV = "SQLALCHEMY_MATVIEW_PGBOUNCER"

PoolMode = Literal["session", "transaction", "statement"]

_START_TIMEOUT = 30.0

# Stopped at exit like the launcher's servers: a PgBouncer left running would hold its port.
_live: dict[int, PgBouncer] = {}


def _cleanup_live() -> None:
    for bouncer in list(_live.values()):
        with contextlib.suppress(Exception):
            bouncer.cleanup()


atexit.register(_cleanup_live)


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` executable: ``$SQLALCHEMY_MATVIEW_PGBOUNCER``, PATH, or Debian's."""
    explicit = os.environ.get(PGBOUNCER_ENV)
    if explicit:
        return Path(explicit)
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


def _private_dir(run_as: _RunAs, prefix: str) -> Path:
    base = "/tmp" if os.path.isdir("/tmp") else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if run_as.uid is not None:
        os.chown(path, run_as.uid, run_as.gid if run_as.gid is not None else -1)
    return path


class PgBouncer:
    """A PgBouncer in front of ``server``, in ``pool_mode`` (transaction by default).

    Every database of the server is reachable through it (``* = host=... port=...``) as
    user ``postgres`` without a password. psycopg must not prepare statements behind
    transaction pooling before PgBouncer 1.21: connect with :attr:`CONNECT_ARGS`.

    Example::

        with PgBouncer(server, pool_mode="transaction") as bouncer:
            engine = sa.create_engine(bouncer.url("app"), connect_args=PgBouncer.CONNECT_ARGS)
    """

    #: ``connect_args`` for psycopg behind transaction pooling: no server-side prepares.
    CONNECT_ARGS: Mapping[str, Any] = {"prepare_threshold": None}

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: PoolMode = "transaction",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.server = server
        self.pool_mode: PoolMode = pool_mode
        self.settings: dict[str, str] = {
            "default_pool_size": "10",
            "max_client_conn": "200",
            **(settings or {}),
        }
        self._dir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 clients connect to."""
        if self._port is None:
            raise PostgresLaunchError("PgBouncer has not been started (call .start())")
        return self._port

    @property
    def logfile(self) -> Path:
        if self._dir is None:
            raise PostgresLaunchError("PgBouncer has not been started (call .start())")
        return self._dir / "pgbouncer.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, database: str = "postgres", driver: str = "psycopg") -> URL:
        """SQLAlchemy URL of ``database`` through PgBouncer."""
        base = URL.create("postgresql", username="postgres", host="127.0.0.1", port=self.port)
        return _url_for(base, database, driver)

    def start(self) -> PgBouncer:
        if self.running:
            return self
        executable = find_pgbouncer()
        if executable is None:
            raise PostgresLaunchError(
                f"pgbouncer not found (apt-get install pgbouncer, or set ${PGBOUNCER_ENV})"
            )
        run_as = _run_as_for(self.server.installation)
        if self._dir is None:
            self._dir = _private_dir(run_as, "mvbouncer-")
            _live[id(self)] = self
        self._port = _free_port()
        config = self._dir / "pgbouncer.ini"
        auth = self._dir / "users.txt"
        auth.write_text('"postgres" ""\n')
        lines = [
            "[databases]",
            f"* = host=127.0.0.1 port={self.server.port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self._port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {auth}",
            f"pool_mode = {self.pool_mode}",
            f"logfile = {self.logfile}",
            "ignore_startup_parameters = extra_float_digits,options",
            *(f"{name} = {value}" for name, value in self.settings.items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        for path in (config, auth):
            if run_as.uid is not None:
                os.chown(path, run_as.uid, run_as.gid if run_as.gid is not None else -1)
        with open(self._dir / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                [*run_as.prefix, str(executable), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                **run_as.popen_kwargs(),
            )
        self._wait_until_listening()
        return self

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = None
                raise PostgresLaunchError(f"PgBouncer exited at start-up:\n{self._log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresLaunchError(f"PgBouncer did not listen:\n{self._log_tail()}")
            time.sleep(0.01)

    def _log_tail(self) -> str:
        assert self._dir is not None
        return _tail(self.logfile) + "\n" + _tail(self._dir / "stdout.log")

    def stop(self) -> None:
        """Stop PgBouncer (SIGINT: safe shutdown), killing it if it does not go."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self) -> None:
        """Stop and delete the directory. Idempotent."""
        self.stop()
        _live.pop(id(self), None)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
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
        return f"<PgBouncer {self.pool_mode}{where} -> {self.server!r}>"


class StandbyServer(PostgresServer):
    """A hot standby of ``primary``, made with ``pg_basebackup -R`` and streaming replication.

    It accepts read-only connections once started; :meth:`wait_for_replay` waits until it
    has replayed everything the primary had written when called.

    Example::

        with StandbyServer(primary) as standby:
            standby.wait_for_replay()
            engine = sa.create_engine(standby.url("app"))
    """

    def __init__(self, primary: PostgresServer, *, settings: Mapping[str, str] | None = None):
        super().__init__(primary.installation, settings=settings)
        self.primary = primary

    def _initdb(self, run_as: _RunAs) -> None:
        cmd = [
            *run_as.prefix,
            str(self.installation.bindir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.datadir),
            "-R",  # standby.signal and primary_conninfo: start as a streaming standby
            "-X",
            "stream",
            "-c",
            "fast",
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
            raise PostgresLaunchError(
                f"pg_basebackup from {self.primary!r} failed, exit {proc.returncode}:\n"
                f"{(proc.stdout + proc.stderr).strip()}"
            )
        self._initialised = True

    def wait_for_replay(self, timeout: float = 60.0) -> float:
        """Wait until the standby has replayed the primary's current WAL position.

        Returns the seconds it took (the replay lag seen by a reader that starts now).
        """
        started = time.monotonic()
        # The insert position, not the write position: with synchronous_commit off (the
        # launcher's default) a commit can still sit in WAL buffers.
        with self.primary._connect() as primary:
            row = primary.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            target = str(row[0])
        with self._connect() as standby:
            while True:
                done = standby.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if done and done[0]:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise PostgresLaunchError(
                        f"the standby did not replay up to {target} within {timeout:.0f}s"
                    )
                time.sleep(0.005)

    def __repr__(self) -> str:
        return "<StandbyServer of " + repr(self.primary) + ">"


class LogicalReplication:
    """Two clusters: a ``publisher`` (``wal_level = logical``) and a ``subscriber``.

    Both are :class:`~sqlalchemy_matview.testing.launcher.PostgresServer` of the same
    installation. Logical replication works per database: :meth:`create_database` makes the
    same (empty) database on both; create the tables on both sides (logical replication
    copies rows, not DDL), then :meth:`publish` on the publisher, :meth:`subscribe` on the
    subscriber, write on the publisher and :meth:`wait_caught_up` before reading the
    subscriber. Rows arrive through the subscription's apply worker, which runs with
    ``session_replication_role = replica``: only triggers enabled ``REPLICA`` or ``ALWAYS``
    fire for them, and statement triggers never do.

    Example::

        with LogicalReplication() as pair:
            db = pair.create_database()
            for server in (pair.publisher, pair.subscriber):
                with server._connect(db) as conn:
                    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            pair.publish(db, ["t"])
            pair.subscribe(db)
            with pair.publisher._connect(db) as conn:
                conn.execute("INSERT INTO t VALUES (1)")
            pair.wait_caught_up(db)
            engine = sa.create_engine(pair.subscriber.url(db))
    """

    #: The publication and subscription names :meth:`publish` and :meth:`subscribe` use
    #: by default.
    NAME = "mv_test"

    PUBLISHER_SETTINGS: Mapping[str, str] = {
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
    }

    def __init__(
        self,
        installation: Installation | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.publisher = PostgresServer(
            installation, settings={**self.PUBLISHER_SETTINGS, **(settings or {})}
        )
        self.subscriber = PostgresServer(self.publisher.installation, settings=settings)

    def start(self) -> LogicalReplication:
        self.publisher.start()
        try:
            self.subscriber.start()
        except BaseException:
            self.publisher.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        """Stop both servers and delete their directories. Idempotent."""
        try:
            self.subscriber.cleanup()
        finally:
            self.publisher.cleanup()

    def create_database(self, name: str | None = None) -> str:
        """Create the same empty database on both servers; returns its name."""
        name = self.publisher.create_database(name)
        self.subscriber.create_database(name)
        return name

    def drop_database(self, name: str) -> None:
        """Drop the subscriptions in ``name`` (and with them their slots), then ``name``
        on both servers. Missing is fine."""
        from psycopg import sql

        with contextlib.suppress(Exception), self.subscriber._connect(name) as conn:
            subscriptions = [
                row[0]
                for row in conn.execute(
                    "SELECT subname FROM pg_catalog.pg_subscription s"
                    " JOIN pg_catalog.pg_database d ON d.oid = s.subdbid"
                    " WHERE d.datname = current_database()"
                )
            ]
            for sub in subscriptions:
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(sub)))
        self.subscriber.drop_database(name)
        with self.publisher._connect() as conn:
            # A slot left by a subscription that could not be dropped keeps the database.
            slots = conn.execute(
                "SELECT slot_name FROM pg_catalog.pg_replication_slots WHERE database = %s",
                (name,),
            ).fetchall()
            for (slot,) in slots:
                with contextlib.suppress(Exception):
                    conn.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot,))
        self.publisher.drop_database(name)

    def publish(
        self, database: str, tables: Sequence[str] | None = None, *, name: str = NAME
    ) -> None:
        """``CREATE PUBLICATION name FOR TABLE ...`` (every table when ``tables`` is None)
        on the publisher. Table names may be ``schema.table``."""
        from psycopg import sql

        target: sql.Composable
        if tables is None:
            target = sql.SQL("FOR ALL TABLES")
        else:
            target = sql.SQL("FOR TABLE {}").format(
                sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in tables)
            )
        with self.publisher._connect(database) as conn:
            conn.execute(sql.SQL("CREATE PUBLICATION {} {}").format(sql.Identifier(name), target))

    def subscribe(
        self,
        database: str,
        *,
        publication: str = NAME,
        name: str = NAME,
        copy_data: bool = True,
        timeout: float = 60.0,
    ) -> None:
        """``CREATE SUBSCRIPTION`` in ``database`` on the subscriber, to the same database
        on the publisher; returns once the initial copy of every table is done."""
        from psycopg import sql

        conninfo = f"host=127.0.0.1 port={self.publisher.port} user=postgres dbname={database}"
        with self.subscriber._connect(database) as conn:
            conn.execute(
                sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({})").format(
                    sql.Identifier(name),
                    sql.Literal(conninfo),
                    sql.Identifier(publication),
                    sql.SQL("copy_data = true" if copy_data else "copy_data = false"),
                )
            )
            self._until(
                timeout,
                f"the subscription {name} in {database} did not finish its initial copy",
                lambda: conn.execute(
                    "SELECT pg_catalog.count(*) = 0 FROM pg_catalog.pg_subscription_rel r"
                    " JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid"
                    " WHERE s.subname = %s AND r.srsubstate NOT IN ('r', 's')",
                    (name,),
                ).fetchone(),
            )
        self.wait_caught_up(database, name=name, timeout=timeout)

    def wait_caught_up(self, database: str, *, name: str = NAME, timeout: float = 60.0) -> float:
        """Wait until the subscription ``name`` has applied every transaction the
        publisher had committed when called; returns the seconds it took."""
        started = time.monotonic()
        with self.publisher._connect(database) as conn:
            # Under synchronous_commit off (the launcher's default) earlier commits may still
            # sit in WAL buffers, where no walsender reads them: a synchronous commit flushes
            # everything before it. It must write WAL of its own: a transaction whose only
            # record is its commit is committed asynchronously whatever the setting. A
            # transactional logical message is such a record, and pgoutput does not send it
            # to subscriptions that did not ask for messages.
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = on")
                conn.execute("SELECT pg_catalog.pg_logical_emit_message(true, 'mv_test', '')")
            row = conn.execute("SELECT pg_catalog.pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            target = str(row[0])
            self._until(
                timeout,
                f"the subscription {name} did not apply the publisher's WAL up to {target}",
                lambda: conn.execute(
                    "SELECT replay_lsn >= %s::pg_lsn FROM pg_catalog.pg_stat_replication"
                    " WHERE application_name = %s AND state = 'streaming'",
                    (target, name),
                ).fetchone(),
            )
        return time.monotonic() - started

    @staticmethod
    def _until(timeout: float, message: str, check: Callable[[], tuple[Any, ...] | None]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            row = check()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise PostgresLaunchError(f"{message} within {timeout:.0f}s")
            time.sleep(0.01)

    def __enter__(self) -> LogicalReplication:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<LogicalReplication {self.publisher!r} -> {self.subscriber!r}>"
