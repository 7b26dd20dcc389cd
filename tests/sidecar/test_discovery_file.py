"""The YAML endpoints file: what it parses to, the problems it names, and reloading it as it changes."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.discovery import Discovery
from sidecar.discovery.file import FileDiscovery, parse_endpoints_file
from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey, ServicePolicy

ARITH = ServiceKey("arith", "default")
WAIT_S = 5.0  # upper bound for anything the watcher should do within a few 10 ms ticks

EXAMPLE = """
services:
  - name: arith
    namespace: default
    ports: [50051]
    annotations:
      kuberpc.io/grpc-services: arith.Arith
      kuberpc.io/lb: weighted-round-robin
    endpoints:
      - {address: 127.0.0.2, port: 15443, weight: 1, tls: true, pod: arith-0}
"""


def one_endpoint_file(address: str = "127.0.0.2", weight: int = 100) -> str:
    return f"services:\n  - name: arith\n    endpoints:\n      - {{address: {address}, port: 15443, weight: {weight}}}\n"


def test_example_file_parses_to_its_catalog() -> None:
    catalog, problems = parse_endpoints_file(EXAMPLE, namespace="default")
    assert problems == []
    assert catalog == Catalog(
        [
            EndpointSet(
                ARITH,
                (Endpoint("127.0.0.2", 15443, weight=1, tls=True, pod="arith-0"),),
                ServicePolicy(grpc_services=("arith.Arith",)),
                ports=(50051,),
            )
        ]
    )


def test_omitted_fields_take_their_defaults() -> None:
    catalog, problems = parse_endpoints_file(
        "services:\n  - name: arith\n    endpoints: [{address: 10.1.2.3, port: 50051}]\n", namespace="team"
    )
    assert problems == []
    es = catalog.get(ServiceKey("arith", "team"))
    assert es is not None
    assert es.endpoints == (
        Endpoint(
            "10.1.2.3", 50051, weight=100, tls=True, ready=True, serving=True, terminating=False, pod=""
        ),
    )
    assert es.ports == () and es.policy == ServicePolicy()


def test_endpoint_conditions_and_plaintext_are_read() -> None:
    text = """
services:
  - name: arith
    endpoints:
      - {address: "::1", port: 50051, tls: false, ready: false, serving: true, terminating: true}
"""
    catalog, problems = parse_endpoints_file(text, namespace="default")
    assert problems == []
    es = catalog.get(ARITH)
    assert es is not None
    assert es.endpoints == (Endpoint("::1", 50051, tls=False, ready=False, serving=True, terminating=True),)


def test_a_service_with_no_endpoints_is_kept() -> None:
    catalog, problems = parse_endpoints_file(
        "services:\n  - {name: arith, ports: [50051]}\n", namespace="default"
    )
    es = catalog.get(ARITH)
    assert problems == [] and es is not None and es.endpoints == ()


def test_numeric_annotation_values_are_read_as_strings() -> None:
    text = "services:\n  - name: arith\n    annotations: {kuberpc.io/retry-budget: 0.5}\n"
    catalog, problems = parse_endpoints_file(text, namespace="default")
    es = catalog.get(ARITH)
    assert problems == [] and es is not None and es.policy.retry_budget == 0.5


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        (
            "{address: 127.0.0.2, port: 15443, weight: -1}",
            "endpoints[0] (127.0.0.2:15443): weight: -1 is not an integer",
        ),
        ("{address: 127.0.0.2, port: 15443, weight: heavy}", "weight: 'heavy'"),
        ("{address: 127.0.0.2, port: 15443, tls: maybe}", "tls: 'maybe' is not true or false"),
        ("{address: 127.0.0.2, port: 15443, color: red}", "unknown field 'color'"),
        ("{address: 127.0.0.2, port: 15443, pod: 7}", "pod: 7 is not a string"),
    ],
)
def test_bad_optional_endpoint_field_is_named_and_defaulted(endpoint: str, problem: str) -> None:
    catalog, problems = parse_endpoints_file(
        f"services:\n  - name: arith\n    endpoints: [{endpoint}]\n", namespace="default"
    )
    es = catalog.get(ARITH)
    assert es is not None and len(es.endpoints) == 1
    assert es.endpoints[0].weight == 100 and es.endpoints[0].tls and es.endpoints[0].pod == ""
    assert (
        len(problems) == 1
        and problems[0].startswith("service arith.default endpoints[0]")
        and problem in problems[0]
    )


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("{address: 'not an address', port: 15443}", "address: 'not an address'"),
        ("{port: 15443}", "address: None"),
        ("{address: 127.0.0.2, port: 70000}", "port: 70000 is not a port"),
        ("{address: 127.0.0.2, port: true}", "port: True is not a port"),
        ("{address: 127.0.0.2}", "port: None is not a port"),
        ("127.0.0.2:15443", "expected a mapping"),
    ],
)
def test_endpoint_without_a_usable_address_or_port_is_skipped_and_named(endpoint: str, problem: str) -> None:
    catalog, problems = parse_endpoints_file(
        f"services:\n  - name: arith\n    endpoints: [{endpoint}]\n", namespace="default"
    )
    es = catalog.get(ARITH)
    assert es is not None and es.endpoints == ()
    assert (
        len(problems) == 1 and "service arith.default endpoints[0]" in problems[0] and problem in problems[0]
    )


@pytest.mark.parametrize(
    ("service", "problem"),
    [
        ("{name: Arith_1}", "services[0]: name: 'Arith_1' is not a Service name"),
        ("{ports: [1]}", "services[0]: name: None"),
        ("{name: arith, namespace: 'a b'}", "services[0] (arith): namespace: 'a b'"),
        ("just-a-name", "services[0]: expected a mapping"),
    ],
)
def test_service_without_a_usable_name_is_skipped_and_named(service: str, problem: str) -> None:
    catalog, problems = parse_endpoints_file(f"services:\n  - {service}\n", namespace="default")
    assert len(catalog) == 0
    assert len(problems) == 1 and problems[0].startswith(problem)


def test_bad_annotation_is_named_with_its_service_and_defaulted() -> None:
    text = "services:\n  - name: arith\n    annotations: {kuberpc.io/lb: fastest}\n"
    catalog, problems = parse_endpoints_file(text, namespace="default")
    es = catalog.get(ARITH)
    assert es is not None and es.policy.lb == "weighted-round-robin"
    assert problems == [
        "service arith.default: kuberpc.io/lb: 'fastest' is not one of weighted-round-robin, p2c-ewma, round-robin, random"
    ]


def test_bad_service_port_is_named_and_the_rest_kept() -> None:
    catalog, problems = parse_endpoints_file(
        "services:\n  - {name: arith, ports: [50051, http, 0]}\n", namespace="default"
    )
    es = catalog.get(ARITH)
    assert es is not None and es.ports == (50051,)
    assert problems == [
        "service arith.default: ports: 'http' is not a port from 1 to 65535 (ignored)",
        "service arith.default: ports: 0 is not a port from 1 to 65535 (ignored)",
    ]


def test_duplicate_endpoint_and_service_are_named_and_the_first_kept() -> None:
    text = """
services:
  - name: arith
    endpoints:
      - {address: 127.0.0.2, port: 15443, weight: 1}
      - {address: 127.0.0.2, port: 15443, weight: 2}
  - name: arith
    namespace: default
"""
    catalog, problems = parse_endpoints_file(text, namespace="default")
    es = catalog.get(ARITH)
    assert es is not None and [e.weight for e in es.endpoints] == [1]
    assert problems == [
        "service arith.default endpoints[1]: 127.0.0.2:15443 is listed twice (first kept)",
        "services[1]: service arith.default is listed twice (first kept)",
    ]


def test_unknown_top_level_field_is_named() -> None:
    _, problems = parse_endpoints_file("services: []\nservice: []\n", namespace="default")
    assert problems == ["unknown top-level field 'service' (known: services)"]


def test_explicitly_empty_services_is_an_empty_catalog() -> None:
    assert parse_endpoints_file("services: []\n", namespace="default") == (Catalog(), [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [\n", "not valid YAML"),
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- name: arith\n", "expected a mapping"),
        ("endpoints: []\n", "'services' must be a list"),
        ("services: {name: arith}\n", "'services' must be a list"),
    ],
)
def test_structurally_unreadable_file_raises(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_endpoints_file(text, namespace="default")


# --- FileDiscovery: the watcher -------------------------------------------------------------


class Published:
    """Collects published catalogs; tests await the next one with a bounded wait."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Catalog] = asyncio.Queue()

    def __call__(self, catalog: Catalog) -> None:
        self.queue.put_nowait(catalog)

    async def next(self) -> Catalog:
        return await asyncio.wait_for(self.queue.get(), WAIT_S)


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition set by the watcher's own log lines, with a bounded deadline."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    # The watcher starts in the fixture, so its first lines are recorded in the setup phase.
    records = caplog.get_records("setup") + caplog.records
    return sum(text in r.getMessage() for r in records)


def endpoints_of(catalog: Catalog) -> list[str]:
    es = catalog.get(ARITH)
    assert es is not None
    return [str(e) for e in es.endpoints]


def write(path: Path, text: str) -> None:
    # Atomic replace, as editors and ConfigMap updates do: the watcher never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="sidecar.discovery.file")
    return caplog


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[tuple[Path, Published]]:
    path = tmp_path / "endpoints.yaml"
    published = Published()
    discovery: Discovery = FileDiscovery(str(path), namespace="default", interval=0.01)
    task = asyncio.create_task(discovery.run(published))
    yield path, published
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_publishes_the_file_catalog_at_start(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(EXAMPLE)
    published = Published()
    task = asyncio.create_task(FileDiscovery(str(path), namespace="default", interval=0.01).run(published))
    try:
        assert await published.next() == parse_endpoints_file(EXAMPLE, namespace="default")[0]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_reloads_when_the_file_changes(watch: tuple[Path, Published]) -> None:
    path, published = watch
    write(path, one_endpoint_file("127.0.0.2"))
    assert endpoints_of(await published.next()) == ["127.0.0.2:15443"]
    write(path, one_endpoint_file("127.0.0.3"))
    assert endpoints_of(await published.next()) == ["127.0.0.3:15443"]


async def test_missing_file_at_start_publishes_nothing_until_it_appears(
    watch: tuple[Path, Published], caplog: pytest.LogCaptureFixture
) -> None:
    path, published = watch
    await until(lambda: logged(caplog, "file missing (no catalog yet)") == 1)
    assert published.queue.empty()
    write(path, one_endpoint_file())
    assert endpoints_of(await published.next()) == ["127.0.0.2:15443"]


async def test_broken_file_keeps_the_last_good_catalog(
    watch: tuple[Path, Published], caplog: pytest.LogCaptureFixture
) -> None:
    path, published = watch
    write(path, one_endpoint_file("127.0.0.2"))
    await published.next()
    write(path, "services: [\n")
    await until(lambda: logged(caplog, "unreadable (keeping the last catalog): not valid YAML") == 1)
    assert published.queue.empty()
    write(path, one_endpoint_file("127.0.0.3"))
    assert endpoints_of(await published.next()) == ["127.0.0.3:15443"]


async def test_deleted_file_keeps_the_last_good_catalog(
    watch: tuple[Path, Published], caplog: pytest.LogCaptureFixture
) -> None:
    path, published = watch
    write(path, one_endpoint_file("127.0.0.2"))
    await published.next()
    path.unlink()
    await until(lambda: logged(caplog, "file missing (keeping the last catalog)") == 1)
    assert published.queue.empty()
    write(path, one_endpoint_file("127.0.0.3"))
    assert endpoints_of(await published.next()) == ["127.0.0.3:15443"]


async def test_rewriting_the_same_catalog_publishes_nothing(
    watch: tuple[Path, Published], caplog_debug: pytest.LogCaptureFixture
) -> None:
    path, published = watch
    write(path, one_endpoint_file("127.0.0.2"))
    await published.next()
    write(path, "# same services, new bytes\n" + one_endpoint_file("127.0.0.2"))
    await until(lambda: logged(caplog_debug, "catalog unchanged") == 1)
    assert published.queue.empty()


async def test_each_problem_is_logged_once(
    watch: tuple[Path, Published], caplog_debug: pytest.LogCaptureFixture
) -> None:
    path, published = watch
    write(path, one_endpoint_file(weight=-5))
    await published.next()
    write(path, "# touched\n" + one_endpoint_file(weight=-5))
    await until(lambda: logged(caplog_debug, "catalog unchanged") == 1)
    assert logged(caplog_debug, "weight: -5 is not an integer") == 1


async def test_configmap_style_symlink_swap_is_noticed_even_with_equal_size_and_mtime(
    watch: tuple[Path, Published], tmp_path: Path
) -> None:
    path, published = watch
    old, new = tmp_path / "..2024_01" / "endpoints.yaml", tmp_path / "..2024_02" / "endpoints.yaml"
    for f, address in ((old, "127.0.0.2"), (new, "127.0.0.3")):
        f.parent.mkdir()
        f.write_text(one_endpoint_file(address))
        os.utime(f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    data = tmp_path / "..data"
    data.symlink_to(old.parent.name)
    path.symlink_to(Path("..data") / "endpoints.yaml")
    assert endpoints_of(await published.next()) == ["127.0.0.2:15443"]
    tmp_link = tmp_path / "..data_tmp"
    tmp_link.symlink_to(new.parent.name)
    os.replace(tmp_link, data)  # what the kubelet does on a ConfigMap update
    assert endpoints_of(await published.next()) == ["127.0.0.3:15443"]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        FileDiscovery("/nonexistent", namespace="default", interval=0)


# ---- which Services select this pod: selectors against the pod's labels (KUBERPC_POD_LABELS) -------------

SELECTORS = """
services:
  - name: arith
    selector: {app: arith}
  - name: arith-canary
    selector: {app: arith, track: canary}
  - name: elsewhere
    namespace: other
    selector: {app: arith}
  - name: by-hand
    endpoints: [{address: 127.0.0.2, port: 15443}]
"""


def test_services_selecting_the_pod_by_its_labels_in_its_namespace_are_named() -> None:
    catalog, problems = parse_endpoints_file(SELECTORS, namespace="default", labels={"app": "arith"})
    assert problems == []
    assert catalog.selecting == frozenset({ARITH})
    es = catalog.get(ServiceKey("arith-canary", "default"))
    assert es is not None and es.selector == (("app", "arith"), ("track", "canary"))


def test_without_the_pods_labels_the_catalog_says_nothing_about_selection() -> None:
    catalog, _ = parse_endpoints_file(SELECTORS, namespace="default")
    assert catalog.selecting is None


def test_a_selector_that_is_not_a_mapping_selects_nothing_and_is_named() -> None:
    text = "services:\n  - name: arith\n    selector: [app, arith]\n"
    catalog, problems = parse_endpoints_file(text, namespace="default", labels={"app": "arith"})
    assert catalog.selecting == frozenset()
    assert problems == ["service arith.default: selector: ['app', 'arith'] is not a mapping of labels (selects no pod)"]
