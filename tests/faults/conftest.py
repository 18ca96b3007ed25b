"""Fixtures and the session summary of the fault-injection suite live in faultkit.py (a uniquely
named module, so tests can import its helpers without clashing with tests/conftest.py)."""

from faultkit import *  # noqa: F401,F403
from faultkit import pytest_terminal_summary  # noqa: F401
