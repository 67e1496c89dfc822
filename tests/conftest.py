"""Test-wide settings, applied before any test imports Ray."""

import os

# Every Ray instance the tests start (ray.init, `ray start --head`, the processes they spawn) binds to 127.0.0.1:
# Ray's switch for clusters on Windows/macOS, off, makes it use loopback addresses on Linux too. Ray reads it
# when imported, so it is set here, first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
