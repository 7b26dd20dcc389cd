"""Where the mesh listens (DESIGN.md §1): the proxy's fixed ports and admin paths, the control-plane port proxies dial.

Constants only, shared by the proxy, the injector and the control plane (webhook/ imports it); no parsing, no I/O.
"""

from __future__ import annotations

from typing import Final

OUTBOUND_PORT: Final = 15001  # app -> proxy, plaintext h2c on loopback
INBOUND_PORT: Final = 15443  # peer proxy -> proxy, mTLS
ADMIN_PORT: Final = 15090  # /metrics /ready /live /shutdown
DEBUG_PORT: Final = 15091  # /debug and /tap, on the pod's loopback only: no containerPort, but taken all the same
# Every port the proxy listens on in the pod's network namespace: an app or an upstream may use none of them.
PROXY_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, DEBUG_PORT})

# The admin server's paths the kubelet probes and Prometheus scrapes (DESIGN.md §5).
READY_PATH: Final = "/ready"
LIVE_PATH: Final = "/live"
METRICS_PATH: Final = "/metrics"

IDENTITY_PORT: Final = 8081  # the control plane's identity service (Certify, gRPC over TLS)
DISCOVERY_PORT: Final = 8082  # the control plane's discovery stream (proto/discovery.proto), mTLS
