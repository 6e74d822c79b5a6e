"""FastAPI example: a dashboard served from a materialized view refreshed by the worker."""
