"""Whole-process scenarios for kuberpc: the example Arith app and the local demo mesh.

Runs processes and talks to them over loopback; must not import the proxy's internals (only its CLI).
"""
