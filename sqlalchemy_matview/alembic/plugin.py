"""Alembic plugin entry point (work in progress)."""

from __future__ import annotations

from typing import Any


def setup(plugin: Any) -> None:
    """Called by Alembic 1.18+ when it loads the ``alembic.plugins`` entry points."""
