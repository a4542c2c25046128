"""Fixtures of the DiT-stage tests; the helpers live in dit_helpers.py (imported by name: pytest puts this folder
on sys.path)."""

from dit_helpers import tiny_module  # noqa: F401  (fixture)
