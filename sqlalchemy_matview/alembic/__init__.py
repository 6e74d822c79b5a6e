"""Alembic support for materialized views (work in progress)."""
