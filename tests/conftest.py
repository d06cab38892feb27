"""Suite-wide settings."""

from __future__ import annotations

import os

from hypothesis import settings

# In CI the examples are derived from each test, so a run is repeatable; locally they are
# random, to keep finding new cases.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
