"""A DDL element whose text is built from the dialect's identifier preparer at compile time.

Tracking and scheduling generate DDL naming relations found in the catalog; building it
inside compilation means every identifier goes through ``compiler.preparer`` (which also
escapes ``%`` for the driver's paramstyle), exactly like the core's DDL constructs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import DDLCompiler, IdentifierPreparer
from sqlalchemy.sql.ddl import ExecutableDDLElement

__all__ = ["PreparedDDL"]


class PreparedDDL(ExecutableDDLElement):
    """DDL produced by ``build(preparer)``; never cached, since each one is built once."""

    __visit_name__ = "sqlalchemy_matview_prepared_ddl"
    inherit_cache = False

    def __init__(self, build: Callable[[IdentifierPreparer], str]) -> None:
        self.build = build


@compiles(PreparedDDL)
def _visit_prepared_ddl(element: PreparedDDL, compiler: DDLCompiler, **kw: Any) -> str:
    return element.build(compiler.preparer)
