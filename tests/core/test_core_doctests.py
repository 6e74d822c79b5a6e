"""The examples in the core modules' docstrings are run, so they stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "sqlalchemy_matview",
    "sqlalchemy_matview.schema",
    "sqlalchemy_matview.incremental",
    "sqlalchemy_matview.ddl",
    "sqlalchemy_matview.query",
    "sqlalchemy_matview.sqltext",
    "sqlalchemy_matview.swap",
    "sqlalchemy_matview.alembic.replace",
    "sqlalchemy_matview.metrics",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 or name == "sqlalchemy_matview.ddl"
    assert result.failed == 0
