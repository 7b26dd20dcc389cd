"""Parsing kuberpc.io/* Service annotations: each key, its problems, and the defaults a bad value falls back to."""

from __future__ import annotations

import re

import pytest

from sidecar.model import ServicePolicy
from sidecar.policy import GRPC_CODES, parse_duration, parse_service_annotations, parse_weight


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("250ns", 2.5e-7),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        (" 2s ", 2.0),
        (".5s", 0.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "s", "-1s", "2 s", "2sec", "1.2.3s", "two seconds", "2s,"])
def test_parse_duration_rejects_with_the_value_named(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@pytest.mark.parametrize(("text", "weight"), [("0", 0), ("100", 100), ("10000", 10000), (" 7 ", 7)])
def test_parse_weight(text: str, weight: int) -> None:
    assert parse_weight(text) == weight


@pytest.mark.parametrize("text", ["10001", "-1", "1.5", "", "abc", "+5", "١٢"])
def test_parse_weight_rejects_with_the_value_named(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_weight(text)


def test_no_annotations_give_the_default_policy_and_no_problems() -> None:
    assert parse_service_annotations({}) == (ServicePolicy(), [])


def test_annotations_of_other_prefixes_are_ignored() -> None:
    assert parse_service_annotations({"app.kubernetes.io/name": "arith", "lb": "x"}) == (ServicePolicy(), [])


def test_every_key_is_parsed() -> None:
    policy, problems = parse_service_annotations(
        {
            "kuberpc.io/lb": "p2c-ewma",
            "kuberpc.io/grpc-services": "arith.Arith, arith.v2.Arith,",
            "kuberpc.io/allow": "default/client, monitoring/*",
            "kuberpc.io/timeout": "1500ms",
            "kuberpc.io/retry": "unavailable,resource-exhausted",
            "kuberpc.io/retry-budget": "0.5",
        }
    )
    assert problems == []
    assert policy == ServicePolicy(
        lb="p2c-ewma",
        grpc_services=("arith.Arith", "arith.v2.Arith"),
        allow=("default/client", "monitoring/*"),
        timeout=1.5,
        retry_on=frozenset({"unavailable", "resource-exhausted"}),
        retry_budget=0.5,
    )


def test_bad_lb_falls_back_to_the_default_and_names_the_choices() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/lb": "fastest"})
    assert policy.lb == "weighted-round-robin"
    assert problems == [
        "kuberpc.io/lb: 'fastest' is not one of weighted-round-robin, p2c-ewma, round-robin, random"
    ]


def test_bad_grpc_service_name_is_reported_and_the_good_ones_kept() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/grpc-services": "arith.Arith,/bad/,9x.Svc"})
    assert policy.grpc_services == ("arith.Arith",)
    assert len(problems) == 2
    assert "kuberpc.io/grpc-services: '/bad/'" in problems[0] and "'9x.Svc'" in problems[1]


def test_bad_allow_entry_is_dropped_and_the_rest_still_applies() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/allow": "default/client,Bad Entry,ns-only"})
    assert policy.allow == ("default/client",)
    assert problems == [
        "kuberpc.io/allow: 'Bad Entry' is not namespace/serviceaccount or namespace/* (entry ignored)",
        "kuberpc.io/allow: 'ns-only' is not namespace/serviceaccount or namespace/* (entry ignored)",
    ]


@pytest.mark.parametrize("entry", ["shop/a..b", "shop/a.-b", "shop/" + "x" * 64 + ".y", "Shop/cart"])
def test_an_allow_entry_no_identity_can_have_is_dropped(entry: str) -> None:
    # The same name rules as a SPIFFE ID's (sidecar/spiffe.py): the looser pattern this parser had let
    # "a..b" or a 64-character label through, which no service account can be named.
    policy, problems = parse_service_annotations({"kuberpc.io/allow": f"shop/cart,{entry}"})
    assert policy.allow == ("shop/cart",)
    assert len(problems) == 1 and "entry ignored" in problems[0]


def test_allow_with_no_valid_entry_denies_everyone_rather_than_allowing_all() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/allow": "*"})
    assert policy.allow == ()
    assert any("every caller is denied" in p for p in problems)


def test_empty_allow_denies_everyone_and_says_so() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/allow": ""})
    assert policy.allow == ()
    assert problems == ["kuberpc.io/allow: '' allows no identity: every caller is denied"]


@pytest.mark.parametrize("value", ["soon", "0s", "-1s"])
def test_bad_timeout_falls_back_to_none(value: str) -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/timeout": value})
    assert policy.timeout is None
    assert len(problems) == 1 and problems[0].startswith("kuberpc.io/timeout:") and repr(value) in problems[0]


def test_retry_accepts_grpc_spellings_of_code_names() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/retry": "UNAVAILABLE, resource_exhausted"})
    assert problems == []
    assert policy.retry_on == frozenset({"unavailable", "resource-exhausted"})


def test_unknown_retry_code_is_reported_and_the_known_ones_kept() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/retry": "unavailable,flaky,ok"})
    assert policy.retry_on == frozenset({"unavailable"})
    assert problems == [
        "kuberpc.io/retry: 'flaky' is not a gRPC status code name (e.g. unavailable)",
        "kuberpc.io/retry: 'ok' is not a gRPC status code name (e.g. unavailable)",
    ]


def test_retry_code_names_map_to_grpc_status_numbers() -> None:
    assert GRPC_CODES["unavailable"] == 14 and GRPC_CODES["resource-exhausted"] == 8
    assert sorted(GRPC_CODES.values()) == list(range(1, 17))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half", "nan", "inf"])
def test_retry_budget_outside_zero_to_one_falls_back_to_the_default(value: str) -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/retry-budget": value})
    assert policy.retry_budget == ServicePolicy().retry_budget
    assert problems == [f"kuberpc.io/retry-budget: {value!r} is not a ratio from 0 to 1"]


@pytest.mark.parametrize(("value", "budget"), [("0", 0.0), ("1", 1.0), (" 0.25 ", 0.25)])
def test_retry_budget_bounds_are_accepted(value: str, budget: float) -> None:
    assert parse_service_annotations({"kuberpc.io/retry-budget": value}) == (
        ServicePolicy(retry_budget=budget),
        [],
    )


def test_unknown_kuberpc_annotation_is_reported_as_a_likely_typo() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/grpc-service": "arith.Arith"})
    assert policy == ServicePolicy()
    assert len(problems) == 1 and problems[0].startswith(
        "kuberpc.io/grpc-service: unknown Service annotation"
    )


def test_every_problem_is_reported_not_just_the_first() -> None:
    _, problems = parse_service_annotations(
        {"kuberpc.io/lb": "x", "kuberpc.io/timeout": "y", "kuberpc.io/retry-budget": "z"}
    )
    assert [p.split(":")[0] for p in problems] == [
        "kuberpc.io/lb",
        "kuberpc.io/timeout",
        "kuberpc.io/retry-budget",
    ]


def test_exporting_grpc_services_is_off_by_default_and_on_only_for_true() -> None:
    assert parse_service_annotations({})[0].export_grpc_services is False
    assert parse_service_annotations({"kuberpc.io/export-grpc-services": "true"})[0].export_grpc_services is True
    assert parse_service_annotations({"kuberpc.io/export-grpc-services": "False"})[0].export_grpc_services is False


def test_a_bad_export_value_does_not_export_and_is_named() -> None:
    policy, problems = parse_service_annotations({"kuberpc.io/export-grpc-services": "yes"})
    assert policy.export_grpc_services is False
    assert problems == ["kuberpc.io/export-grpc-services: 'yes' is not true or false (not exported)"]
