"""Python bindings of proto/arith.proto, generated in memory by grpcio-tools on first import.

Writes nothing to disk, so a fresh clone needs no build step; must not be given other .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import grpc

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = PROTO_DIR / "arith.proto"
SERVICE = "arith.Arith"
# Initial metadata every server reply carries: which replica answered (the demo counts shares with it).
REPLICA_HEADER = "x-replica"


def _load() -> tuple[ModuleType, ModuleType]:
    # grpc.protos_and_services resolves the file against sys.path, so the proto directory is put there
    # only while it runs (this module's own import lock makes that happen once).
    sys.path.insert(0, str(PROTO_DIR))
    try:
        messages, services = grpc.protos_and_services(PROTO_FILE.name)
    finally:
        sys.path.remove(str(PROTO_DIR))
    return messages, services


arith_pb2, arith_pb2_grpc = _load()
