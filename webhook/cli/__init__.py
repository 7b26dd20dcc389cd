"""`kuberpc` (also `kubectl kuberpc`): the operator's command line for a kuberpc mesh.

Each command is a pure core (documents or metric samples in, rows out) behind a thin adapter to the
API server (kube.py); the control plane's own code paths are reused, never re-implemented.
"""
