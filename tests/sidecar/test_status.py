"""The one definition of gRPC status codes matches grpcio's and reads as it travels."""

from __future__ import annotations

import grpc

from sidecar.status import Status


def test_every_code_is_grpcios_by_name_and_number() -> None:
    assert {s.name: int(s) for s in Status} == {c.name: c.value[0] for c in grpc.StatusCode}


def test_a_status_reads_as_its_number_as_in_grpc_status_and_metric_labels() -> None:
    assert (str(Status.UNAVAILABLE), f"{Status.OK}") == ("14", "0")


def test_annotations_spell_a_status_in_kebab_case() -> None:
    assert Status.RESOURCE_EXHAUSTED.kebab == "resource-exhausted"
