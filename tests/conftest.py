"""Shared fixtures. Unit tests here need no services; integration tests start their own."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests must not pick up a developer's STREAMER_* settings.
for _name in [n for n in os.environ if n.startswith("STREAMER_")]:
    del os.environ[_name]
