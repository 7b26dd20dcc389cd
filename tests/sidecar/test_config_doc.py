"""`python -m sidecar run --help` documents every environment variable the proxy reads, and nothing else.

config.load is the one reader of the environment: a mapping that records every key asked of it shows
which variables exist, whatever branch of load reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from sidecar import config
from sidecar.__main__ import main


class RecordingEnviron(Mapping[str, str]):
    """An environment that remembers every variable read from it."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return self.values.get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("config.load must ask for variables by name, not enumerate the environment")

    def __len__(self) -> int:
        return len(self.values)


# Values that take load() down every branch (identity service on: it reads the most variables).
EVERY_BRANCH = {
    "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:15001",
    "KUBERPC_INBOUND_ADDR": "0.0.0.0:15443",
    "KUBERPC_ADMIN_ADDR": "0.0.0.0:15090",
    "KUBERPC_APP_PORT": "50051",
    "KUBERPC_UPSTREAMS": "arith.default:50051=9001",
    "KUBERPC_DISCOVERY": "kubernetes",
    "KUBERPC_DISCOVERY_NAMESPACES": "default",
    "KUBERPC_TLS_CERT": "/var/run/kuberpc/cert.pem",
    "KUBERPC_TLS_KEY": "/var/run/kuberpc/key.pem",
    "KUBERPC_TRUST_ANCHORS": "/etc/kuberpc/ca.pem",
    "KUBERPC_TRUST_DOMAIN": "cluster.local",
    "KUBERPC_IDENTITY_ADDR": "kuberpc-identity.kuberpc-system.svc:8444",
    "KUBERPC_IDENTITY_TOKEN": "/var/run/secrets/tokens/kuberpc",
    "KUBERPC_DRAIN_SECONDS": "5",
    "KUBERPC_LOG_LEVEL": "info",
    "KUBERPC_CONNECTIONS_PER_ENDPOINT": "2",
    "POD_NAMESPACE": "default",
    "POD_NAME": "client-1",
    "POD_IP": "10.1.2.3",
    "SERVICE_ACCOUNT": "client",
}


def test_every_variable_the_proxy_reads_is_documented_and_every_documented_one_is_read() -> None:
    environ = RecordingEnviron(dict(EVERY_BRANCH))

    config.load(environ)

    assert environ.read == set(config.ENV_DOC)


def test_run_help_lists_every_variable_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])

    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name, meaning in config.ENV_DOC.items():
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(name + " ")), None)
        assert line is not None, f"{name} missing from run --help"
        assert meaning.split()[0] in line, f"{name}: its meaning is not on its line"
