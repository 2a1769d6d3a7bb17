"""Test-session settings shared by tests/ and the notebooks (collected by nbmake)."""

import os

# Haystack sends anonymous usage telemetry by default; the tests run offline, so every
# attempt would only retry a DNS lookup and log errors. Users keep Haystack's default.
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
