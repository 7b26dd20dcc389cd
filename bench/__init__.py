"""Side-by-side benchmark of kuberpc, Envoy and nginx on the same gRPC calls (issue #4); run with `python -m bench`.

Drives whole processes over loopback only; it must not import the proxy's internals (it measures the binary users run).
"""
