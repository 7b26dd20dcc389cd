"""Fixtures for proxy tests (the machinery lives in harness.py, importable by test modules)."""

from tests.sidecar.harness import backend, mesh_certs, pair

__all__ = ["backend", "mesh_certs", "pair"]
