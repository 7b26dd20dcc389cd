"""The committed protobuf modules are exactly what protoc makes of proto/identity.proto today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("identity_pb2.py", "identity_pb2.pyi", "identity_pb2_grpc.py")


def test_generated_identity_modules_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    shutil.copy(REPO / "proto" / "identity.proto", tmp_path / "proto" / "identity.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "proto/identity.proto"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_text()
        committed = (REPO / "proto" / name).read_text()
        assert committed == fresh, f"proto/{name} is stale: run `make proto` and commit the result"
