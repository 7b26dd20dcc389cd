"""Routing an outbound call: dedicated port, then :authority, then gRPC service name; misses say what was looked up."""

from __future__ import annotations

import pytest

from sidecar.model import Catalog, Endpoint, EndpointSet, ServiceKey, ServicePolicy
from sidecar.routing import RouteMiss, Router, grpc_service_of, split_authority

ARITH = ServiceKey("arith", "default")
ARITH_PROD = ServiceKey("arith", "prod")
ECHO = ServiceKey("echo", "default")
EMPTY = ServiceKey("empty", "default")
PORTLESS = ServiceKey("portless", "default")


@pytest.fixture
def router() -> Router:
    ep = (Endpoint("10.0.0.1", 15443),)
    catalog = Catalog(
        [
            EndpointSet(ARITH, ep, ServicePolicy(grpc_services=("arith.Arith",)), ports=(50051,)),
            EndpointSet(ARITH_PROD, ep, ports=(50051,)),
            EndpointSet(ECHO, ep, ServicePolicy(grpc_services=("echo.Echo", "echo.v2.Echo")), ports=(8080,)),
            EndpointSet(EMPTY, (), ServicePolicy(grpc_services=("empty.Empty",)), ports=(50051,)),
            EndpointSet(PORTLESS, ep),
        ]
    )
    return Router(catalog, namespace="default")


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("arith", ARITH),
        ("arith:50051", ARITH),
        ("arith.default", ARITH),
        ("arith.default:50051", ARITH),
        ("arith.default.svc", ARITH),
        ("arith.default.svc:50051", ARITH),
        ("arith.default.svc.cluster.local", ARITH),
        ("arith.default.svc.cluster.local:50051", ARITH),
        ("arith.prod", ARITH_PROD),
        ("arith.prod.svc.cluster.local:50051", ARITH_PROD),
        ("ARITH.Default.svc.cluster.local.:50051", ARITH),
        ("arith.default.svc.corp.example", ARITH),
    ],
)
def test_authority_forms_name_the_service(router: Router, authority: str, expected: ServiceKey) -> None:
    assert router.resolve(authority, "/unrelated.Svc/M") == expected


def test_short_name_resolves_in_the_proxy_namespace() -> None:
    catalog = Catalog([EndpointSet(ARITH_PROD, ()), EndpointSet(ARITH, ())])
    assert Router(catalog, namespace="prod").resolve("arith", "/x.Y/Z") == ARITH_PROD


def test_service_without_listed_ports_matches_any_authority_port(router: Router) -> None:
    assert router.resolve("portless:1234", "/x.Y/Z") == PORTLESS


@pytest.mark.parametrize(
    "authority", ["127.0.0.1:15001", "127.0.0.1", "localhost:15001", "localhost", "[::1]:15001", "::1"]
)
def test_address_authority_falls_through_to_the_grpc_service(router: Router, authority: str) -> None:
    assert router.resolve(authority, "/echo.Echo/Say") == ECHO


@pytest.mark.parametrize("authority", ["unknown", "unknown.default:50051", "api.example.com:443", None, ""])
def test_unknown_or_absent_authority_falls_through_to_the_grpc_service(
    router: Router, authority: str | None
) -> None:
    assert router.resolve(authority, "/echo.v2.Echo/Say") == ECHO


def test_authority_with_a_port_the_service_lacks_falls_through(router: Router) -> None:
    assert router.resolve("arith:9999", "/echo.Echo/Say") == ECHO


def test_authority_wins_over_the_grpc_service(router: Router) -> None:
    assert router.resolve("echo:8080", "/arith.Arith/Add") == ECHO


def test_dedicated_upstream_port_wins_over_authority_and_path(router: Router) -> None:
    assert router.resolve("echo:8080", "/arith.Arith/Add", upstream=ARITH_PROD) == ARITH_PROD


def test_known_service_without_endpoints_still_resolves(router: Router) -> None:
    assert router.resolve(None, "/empty.Empty/Get") == EMPTY
    assert router.resolve("empty", "/x.Y/Z") == EMPTY


def test_miss_names_authority_grpc_service_path_and_namespace(router: Router) -> None:
    miss = router.resolve("foo:50051", "/pkg.Svc/M")
    assert isinstance(miss, RouteMiss)
    assert miss.looked_up.startswith("no service for authority 'foo:50051'")
    assert "gRPC service 'pkg.Svc' (path /pkg.Svc/M)" in miss.looked_up
    assert miss.looked_up.endswith("in namespace default")


def test_miss_says_why_an_authority_matched_nothing(router: Router) -> None:
    for authority, reason in [
        ("127.0.0.1:15001", "an address"),
        ("arith:9999", "has no port 9999"),
        ("foo", "no service 'foo.default'"),
    ]:
        miss = router.resolve(authority, "/pkg.Svc/M")
        assert isinstance(miss, RouteMiss) and reason in miss.looked_up, miss


def test_miss_without_authority_names_only_the_grpc_service(router: Router) -> None:
    miss = router.resolve(None, "/pkg.Svc/M")
    assert miss == RouteMiss("no service for gRPC service 'pkg.Svc' (path /pkg.Svc/M) in namespace default")


def test_miss_for_a_path_that_is_not_service_and_method(router: Router) -> None:
    miss = router.resolve(None, "/nomethod")
    assert isinstance(miss, RouteMiss) and "'/nomethod' (not /service/method)" in miss.looked_up


def test_unknown_dedicated_upstream_is_a_miss_naming_it(router: Router) -> None:
    miss = router.resolve("arith", "/arith.Arith/Add", upstream=ServiceKey("gone", "default"))
    assert isinstance(miss, RouteMiss) and "'gone.default'" in miss.looked_up


def test_repeated_resolve_returns_the_same_answer(router: Router) -> None:
    assert router.resolve("arith:50051", "/a.B/C") == router.resolve("arith:50051", "/a.B/C") == ARITH
    assert router.resolve("x", "/a.B/C") == router.resolve("x", "/a.B/C")


def test_memo_never_holds_more_than_its_limit_and_answers_stay_right() -> None:
    catalog = Catalog([EndpointSet(ARITH, (), ServicePolicy(grpc_services=("arith.Arith",)))])
    router = Router(catalog, namespace="default", memo_limit=8)
    for i in range(100):
        assert isinstance(router.resolve(f"host-{i}", f"/p{i}.S/M"), RouteMiss)
        assert router.memo_size <= 8
    assert router.resolve("host-0", "/arith.Arith/Add") == ARITH
    assert router.memo_size == 8


def test_memo_limit_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="memo_limit"):
        Router(Catalog(), namespace="default", memo_limit=0)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/arith.Arith/Add", "arith.Arith"),
        ("/a.b.c.Svc/M", "a.b.c.Svc"),
        ("/Svc/M", "Svc"),
        ("/M", ""),
        ("", ""),
        ("x/y", ""),
    ],
)
def test_grpc_service_of_path(path: str, expected: str) -> None:
    assert grpc_service_of(path) == expected


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("arith:50051", ("arith", 50051)),
        ("arith", ("arith", None)),
        ("Arith.Default.", ("arith.default", None)),
        ("[::1]:15001", ("[::1]", 15001)),
        ("::1", ("::1", None)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


# ---- path routing stays in the caller's namespace unless a Service exports its gRPC names ----------------

ATTACKER = ServiceKey("a", "attacker")
SHARED = ServiceKey("geo", "platform")


def _claims(*sets: EndpointSet) -> Router:
    return Router(Catalog(sets), namespace="default")


def _claim(key: ServiceKey, *names: str, export: bool = False) -> EndpointSet:
    return EndpointSet(key, (), ServicePolicy(grpc_services=names, export_grpc_services=export))


def test_a_service_of_another_namespace_claiming_the_name_is_not_reached_by_path() -> None:
    router = _claims(_claim(ATTACKER, "arith.Arith"))
    miss = router.resolve("127.0.0.1:15001", "/arith.Arith/Add")
    assert isinstance(miss, RouteMiss) and "in namespace default" in miss.looked_up


def test_the_callers_namespace_wins_over_a_service_sorted_before_it_elsewhere() -> None:
    # `a.attacker` sorts before `arith.default`: the first-sorted claimant used to win.
    router = _claims(_claim(ATTACKER, "arith.Arith", export=True), _claim(ARITH, "arith.Arith"))
    assert router.resolve("127.0.0.1:15001", "/arith.Arith/Add") == ARITH


def test_an_exported_service_of_another_namespace_is_reached_by_path() -> None:
    router = _claims(_claim(SHARED, "geo.Geo", export=True))
    assert router.resolve(None, "/geo.Geo/Locate") == SHARED


def test_two_claimants_in_the_callers_namespace_are_unavailable_naming_both() -> None:
    router = _claims(_claim(ARITH, "arith.Arith"), _claim(ECHO, "arith.Arith"))
    miss = router.resolve("127.0.0.1:15001", "/arith.Arith/Add")
    assert isinstance(miss, RouteMiss)
    assert "'arith.default' and 'echo.default'" in miss.looked_up


def test_two_exported_claimants_elsewhere_are_unavailable_naming_both() -> None:
    router = _claims(_claim(ATTACKER, "geo.Geo", export=True), _claim(SHARED, "geo.Geo", export=True))
    miss = router.resolve(None, "/geo.Geo/Locate")
    assert isinstance(miss, RouteMiss)
    assert "'a.attacker' and 'geo.platform'" in miss.looked_up and "export-grpc-services" in miss.looked_up


def test_an_authority_naming_another_namespace_is_the_callers_explicit_choice() -> None:
    router = _claims(_claim(ATTACKER, "arith.Arith"))
    assert router.resolve("a.attacker:50051", "/arith.Arith/Add") == ATTACKER
