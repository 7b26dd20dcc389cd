"""Specification of `python -m sidecar certs`: CA and workload files, their modes, and what is printed."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.certs import main
from sidecar.identity import SpiffeId, client_context, peer_identity, server_context


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _issue(ca_dir: Path, out: Path, *extra: str, ns: str = "default", sa: str = "arith") -> int:
    return main(
        [
            "issue",
            "--ca-dir",
            str(ca_dir),
            "--namespace",
            ns,
            "--service-account",
            sa,
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "ca"
    assert main(["ca", "--dir", str(directory)]) == 0
    capsys.readouterr()
    return directory


def _leaf(chain: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain.read_bytes())[0]


def test_ca_writes_certificate_and_a_0600_private_key(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    assert main(["ca", "--dir", str(directory)]) == 0
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (directory / "ca-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert _mode(directory / "ca-key.pem") == 0o600


def test_ca_output_names_paths_but_no_key_material(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "--dir", str(tmp_path / "ca"), "--trust-domain", "example.org"]) == 0
    out, err = capsys.readouterr()
    assert "spiffe://example.org" in out
    assert str(tmp_path / "ca" / "ca-key.pem") in out
    assert "PRIVATE KEY" not in out + err


def test_ca_refuses_to_overwrite_an_existing_ca(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "ca-key.pem").read_bytes(), (ca_dir / "ca.pem").read_bytes()
    assert main(["ca", "--dir", str(ca_dir)]) == 2
    assert ((ca_dir / "ca-key.pem").read_bytes(), (ca_dir / "ca.pem").read_bytes()) == before
    err = capsys.readouterr().err
    assert "--force" in err
    assert len(err.strip().splitlines()) == 1


def test_ca_force_replaces_an_existing_ca(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    assert main(["ca", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.pem").read_bytes() != before
    assert _mode(ca_dir / "ca-key.pem") == 0o600


def test_ca_rejects_an_invalid_trust_domain_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "--dir", str(tmp_path / "ca"), "--trust-domain", "Not A Domain"]) == 2
    err = capsys.readouterr().err
    assert "'Not A Domain'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ca").exists()


def test_issue_writes_chain_key_and_trust_anchors(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arith"
    assert _issue(ca_dir, out) == 0
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    assert len(chain) == 2
    assert (out / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert chain[1] == x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/arith"
    ]
    assert _mode(out / "key.pem") == 0o600


def test_issue_output_names_identity_and_paths_but_no_key_material(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "arith"
    assert _issue(ca_dir, out, ns="shop", sa="frontend") == 0
    stdout, stderr = capsys.readouterr()
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in stdout
    for name in ("cert.pem", "key.pem", "ca.pem"):
        assert str(out / name) in stdout
    assert "PRIVATE KEY" not in stdout + stderr


def test_issue_replaces_a_readable_key_file_with_a_0600_one(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arith"
    out.mkdir()
    (out / "key.pem").write_text("old")
    (out / "key.pem").chmod(0o644)
    assert _issue(ca_dir, out) == 0
    assert _mode(out / "key.pem") == 0o600
    assert (out / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_issue_hours_sets_the_lifetime(ca_dir: Path, tmp_path: Path) -> None:
    assert _issue(ca_dir, tmp_path / "w", "--hours", "2") == 0
    leaf = _leaf(tmp_path / "w" / "cert.pem")
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    # notBefore is backdated by at most a few minutes for clock skew.
    assert datetime.timedelta(hours=2) <= life <= datetime.timedelta(hours=2, minutes=5)


def test_issue_defaults_to_24_hours(ca_dir: Path, tmp_path: Path) -> None:
    assert _issue(ca_dir, tmp_path / "w") == 0
    leaf = _leaf(tmp_path / "w" / "cert.pem")
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=24) <= life <= datetime.timedelta(hours=24, minutes=5)


def test_issue_adds_dns_names(ca_dir: Path, tmp_path: Path) -> None:
    assert _issue(ca_dir, tmp_path / "w", "--dns", "arith.default.svc", "--dns", "localhost") == 0
    san = _leaf(tmp_path / "w" / "cert.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["arith.default.svc", "localhost"]


def test_issue_without_a_ca_fails_with_one_line_naming_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _issue(tmp_path / "missing", tmp_path / "w") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_issue_with_only_half_a_ca_names_the_missing_file(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ca_dir / "ca-key.pem").unlink()
    assert _issue(ca_dir, tmp_path / "w") == 2
    assert str(ca_dir / "ca-key.pem") in capsys.readouterr().err


def test_issue_rejects_an_invalid_namespace_in_one_line(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _issue(ca_dir, tmp_path / "w", ns="Not_A_Namespace") == 2
    err = capsys.readouterr().err
    assert "'Not_A_Namespace'" in err
    assert len(err.strip().splitlines()) == 1


def test_issue_rejects_a_trust_domain_other_than_the_cas(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _issue(ca_dir, tmp_path / "w", "--trust-domain", "example.org") == 2
    assert "'cluster.local'" in capsys.readouterr().err


def test_issue_rejects_a_non_positive_lifetime(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _issue(ca_dir, tmp_path / "w", "--hours", "0") == 2
    assert "--hours" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["issue", "--ca-dir", "x"]) == 2
    assert "--namespace" in capsys.readouterr().err


def _handshake_in_memory(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Runs a TLS handshake between two contexts through memory buffers (no sockets); returns (server, client)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False)
    done = {"s": False, "c": False}
    for _ in range(10):  # a TLS 1.3 handshake takes two round trips; ten is ample
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return s, c
    raise AssertionError("handshake did not complete")


def test_issued_files_establish_mutual_tls(ca_dir: Path, tmp_path: Path) -> None:
    assert _issue(ca_dir, tmp_path / "server", sa="arith") == 0
    assert _issue(ca_dir, tmp_path / "client", ns="shop", sa="frontend") == 0
    srv, cli = tmp_path / "server", tmp_path / "client"
    server_ctx = server_context(str(srv / "cert.pem"), str(srv / "key.pem"), str(srv / "ca.pem"))
    client_ctx = client_context(str(cli / "cert.pem"), str(cli / "key.pem"), str(cli / "ca.pem"))
    s, c = _handshake_in_memory(server_ctx, client_ctx)
    assert peer_identity(s) == SpiffeId("cluster.local", "shop", "frontend")
    assert peer_identity(c) == SpiffeId("cluster.local", "default", "arith")
