"""`kuberpc.io/upstreams` (DESIGN.md §2), parsed by the one parser the injector and the proxy share.

The injector and the proxy used to parse it with two functions that disagreed at the edges (listed below); each
edge case says what each side did before, and the properties pin the grammar both now read.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import config
from sidecar.model import ServiceKey, Upstream
from sidecar.policy import UpstreamsError, format_upstreams, parse_upstreams
from sidecar.ports import PROXY_PORTS
from sidecar.spiffe import is_dns_label

NS = "shop"
LABELS = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?\Z")
SERVICE_PORTS = st.integers(1, 65535)
LOCAL_PORTS = st.integers(1, 65535).filter(lambda p: p not in PROXY_PORTS)
BLANK = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def upstream_lists(draw: st.DrawFn) -> list[Upstream]:
    locals_ = draw(st.lists(LOCAL_PORTS, max_size=6, unique=True))
    return [
        Upstream(ServiceKey(draw(LABELS), draw(st.one_of(st.just(NS), LABELS))), draw(SERVICE_PORTS), local)
        for local in locals_
    ]


@st.composite
def spelled(draw: st.DrawFn, ups: list[Upstream]) -> str:
    """One of the ways a user may write these upstreams: any name form, blanks and empty entries anywhere allowed."""
    entries = []
    for up in ups:
        forms = [f"{up.service.name}.{up.service.namespace}", f"{up.service}.svc", f"{up.service}.svc.cluster.local"]
        if up.service.namespace == NS:
            forms.append(up.service.name)
        name = draw(st.sampled_from(forms))
        b = [draw(BLANK) for _ in range(6)]
        entries.append(f"{b[0]}{name}{b[1]}:{b[2]}{up.port}{b[3]}={b[4]}{up.local_port}{b[5]}")
        if draw(st.booleans()):
            entries.append(draw(BLANK))  # an empty entry: "a:1=2,,b:3=4"
    return ",".join(entries)


@given(data=st.data(), ups=upstream_lists())
def test_every_spelling_of_upstreams_parses_to_the_same_upstreams(data: st.DataObject, ups: list[Upstream]) -> None:
    assert parse_upstreams(data.draw(spelled(ups)), NS) == tuple(ups)


@given(ups=upstream_lists())
def test_the_normal_form_reads_back_to_the_same_upstreams(ups: list[Upstream]) -> None:
    text = format_upstreams(ups)
    assert parse_upstreams(text, "elsewhere") == tuple(ups)
    assert format_upstreams(parse_upstreams(text, "elsewhere")) == text


TOKENS = st.sampled_from(
    ["arith", "Arith", "a-b", "-a", ".", ":", "=", ",", " ", "\n", "svc", "cluster", "local", "default",
     "0", "1", "80", "9001", "15001", "65535", "65536", "000080", "+", "\u0665", "\xb2", "x" * 64]
)  # fmt: skip


@given(text=st.lists(TOKENS, max_size=14).map("".join) | st.text(max_size=40))
def test_any_text_gives_valid_upstreams_or_names_each_bad_entry(text: str) -> None:
    try:
        ups = parse_upstreams(text, NS)
    except UpstreamsError as e:
        assert e.problems and all(p.isascii() and len(p) < 160 for p in e.problems)
        return
    for up in ups:
        assert is_dns_label(up.service.name) and is_dns_label(up.service.namespace)
        assert 1 <= up.port <= 65535 and 1 <= up.local_port <= 65535 and up.local_port not in PROXY_PORTS
    assert len({up.local_port for up in ups}) == len(ups)
    assert parse_upstreams(format_upstreams(ups), "elsewhere") == ups


ARITH = (Upstream(ServiceKey("arith", "default"), 50051, 9001),)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # The proxy read the first two labels and ignored the rest; the injector refused: both refuse now.
        ("arith.default.svc.example.com:50051=9001", "is not svc.ns[.svc[.cluster.local]]"),
        ("arith.default.svc.:50051=9001", "is not svc.ns[.svc[.cluster.local]]"),
        # The proxy took 000080 as port 80, the injector refused more than five digits.
        ("arith.default:000080=9001", "'000080' is not a port"),
        # Both took other scripts' digits as numbers (str.isdigit); `$` let a newline through a label.
        ("arith.default:\u0665\u0660=9001", "is not a port"),
        ("arith.default:50051=\u0669\u0660\u0660\u0661", "is not a port"),
        ("arith\n.default:50051=9001", "'arith\\n' is not a DNS label"),
        # The same on both sides before, kept.
        ("arith", "'arith' is not svc.ns:port=localport"),
        ("Arith.default:50051=9001", "'Arith' is not a DNS label"),
        ("arith.default:+80=9001", "'+80' is not a port"),
        ("arith.default:50051=15090", "local port 15090 is a proxy port"),
        ("arith:1=9001,ledger:2=9001", "local port 9001 is used twice"),
    ],
)
def test_edge_cases_the_two_parsers_disagreed_on_are_refused_naming_the_entry(text: str, says: str) -> None:
    with pytest.raises(UpstreamsError) as e:
        parse_upstreams(text, "default")
    assert says in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        # The injector refused a blank before the colon ('default ' is not a DNS label); the proxy allowed it.
        "arith.default :50051=9001",
        " arith.default : 50051 = 9001 ,",
        "arith.default.svc.cluster.local:50051=9001",
        "arith:50051=9001",
    ],
)
def test_blanks_and_the_cluster_dns_forms_of_a_name_are_accepted(text: str) -> None:
    assert parse_upstreams(text, "default") == ARITH


def test_every_bad_entry_is_named_not_only_the_first() -> None:
    with pytest.raises(UpstreamsError) as e:
        parse_upstreams("a:1=15001,B:2=9001,c:3=9002,d:4=9002,e:5=9003", NS)
    assert e.value.problems == [
        "'a:1=15001': local port 15001 is a proxy port",
        "'B:2=9001': 'B' is not a DNS label",
        "'d:4=9002': local port 9002 is used twice",
    ]


def test_the_proxy_reports_every_bad_entry_of_its_environment() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(
            {
                "KUBERPC_INBOUND_ADDR": "off",
                "KUBERPC_TLS_CERT": "c", "KUBERPC_TLS_KEY": "k", "KUBERPC_TRUST_ANCHORS": "a",
                "KUBERPC_UPSTREAMS": "a:1=15001,b:2=x",
            }
        )  # fmt: skip
    assert e.value.problems == [
        "KUBERPC_UPSTREAMS: 'a:1=15001': local port 15001 is a proxy port",
        "KUBERPC_UPSTREAMS: 'b:2=x': 'x' is not a port (1-65535)",
    ]


def test_a_long_entry_is_quoted_short_in_messages() -> None:
    with pytest.raises(UpstreamsError) as e:
        parse_upstreams("x" * 500, NS)
    assert len(str(e.value)) < 120 and "..." in str(e.value)
