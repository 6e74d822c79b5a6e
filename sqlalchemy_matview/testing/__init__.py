"""Testing helpers: a throwaway PostgreSQL server and a pytest plugin.

The pytest plugin (:mod:`sqlalchemy_matview.testing.plugin`) is registered as
an entry point and loads automatically once the package is installed; it
provides the ``pg_server``, ``pg_url``, ``engine``, ``async_engine`` and
``pg_cron_server`` fixtures.  This module only re-exports the launcher, which
needs nothing beyond SQLAlchemy (psycopg is imported when a database is
created).

Example::

    from sqlalchemy_matview.testing import PostgresServer

    with PostgresServer() as srv:
        print(srv.version, srv.url(srv.create_database()))
"""

from sqlalchemy_matview.testing.launcher import (
    BINDIR_ENV,
    ExternalServer,
    Installation,
    PostgresLaunchError,
    PostgresServer,
    TemporaryPostgres,
    default_installation,
    find_installations,
    pg_cron_available,
)

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
