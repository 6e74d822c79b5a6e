"""Suite-wide test configuration.

The PostgreSQL fixtures (``pg_server``, ``pg_url``, ``engine``, ``async_engine``,
``pg_cron_server``) come from the ``sqlalchemy_matview.testing.plugin`` pytest
plugin, which the package registers as an entry point: do not list it in
``pytest_plugins``.  Put fixtures specific to one area in that folder's own
``conftest.py``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Database round-trips make example timings noisy, and CI machines are slower.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
