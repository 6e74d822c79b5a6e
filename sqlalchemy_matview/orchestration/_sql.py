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

__all__ = ["CompiledDDL", "PreparedDDL"]


class CompiledDDL(ExecutableDDLElement):
    """DDL produced by ``build(compiler)`` (its preparer, and its SQL compiler for
    expressions and literals); never cached, since each one is built once."""

    __visit_name__ = "sqlalchemy_matview_compiled_ddl"
    inherit_cache = False

    def __init__(self, build: Callable[[DDLCompiler], str]) -> None:
        self.build = build


@compiles(CompiledDDL)
def _visit_compiled_ddl(element: CompiledDDL, compiler: DDLCompiler, **kw: Any) -> str:
    return element.build(compiler)


def PreparedDDL(build: Callable[[IdentifierPreparer], str]) -> CompiledDDL:
    """DDL produced by ``build(preparer)``: only identifiers to quote."""
    return CompiledDDL(lambda compiler: build(compiler.preparer))
