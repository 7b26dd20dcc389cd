"""The committed protobuf modules are exactly what protoc makes of proto/*.proto today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTOS = ("identity", "discovery")
GENERATED = tuple(f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))


def test_generated_modules_match_the_protos(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    for p in PROTOS:
        shutil.copy(REPO / "proto" / f"{p}.proto", tmp_path / "proto" / f"{p}.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", *(f"proto/{p}.proto" for p in PROTOS)],
        cwd=tmp_path, check=True, capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_text()
        committed = (REPO / "proto" / name).read_text()
        assert committed == fresh, f"proto/{name} is stale: run `make proto` and commit the result"


def test_the_generator_is_the_one_the_lock_pins() -> None:
    """The comparison above is only reproducible because `make setup` installs grpcio-tools from the lock."""
    from importlib.metadata import version

    lock = (REPO / "requirements" / "dev.lock").read_text()
    pinned = [line.split("==")[1].split()[0] for line in lock.splitlines() if line.startswith("grpcio-tools==")]
    assert pinned == [version("grpcio-tools")]


def test_the_images_pin_what_the_lock_pins() -> None:
    """The images install requirements/{sidecar,webhook}.txt: the same versions CI tested from the lock."""
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, _, version = line.split(" ")[0].partition("==")
                out[name.lower().replace("_", "-")] = version
        return out

    lock = pins(REPO / "requirements" / "dev.lock")
    for image in ("sidecar.txt", "webhook.txt"):
        drift = {n: (v, lock.get(n)) for n, v in pins(REPO / "requirements" / image).items() if lock.get(n) != v}
        assert not drift, f"requirements/{image} differs from the lock: {drift}"
