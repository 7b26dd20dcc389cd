"""kuberpc's control plane: the mutating admission webhook that injects the proxy, and its installer.

Shares nothing with `sidecar` but the contract in DESIGN.md (ports, annotations, env names).
"""

# No `from __future__ import annotations` here: it would shadow the `webhook.annotations` module.
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kuberpc")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0.0.0"
