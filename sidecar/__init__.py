"""kuberpc sidecar proxy: a lean HTTP/2 stream relay for gRPC between meshed pods."""

__version__ = "0.1.0"
