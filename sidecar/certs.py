"""`python -m sidecar certs`: create a mesh CA and issue workload certificates into files, for runs outside Kubernetes.

Writes files atomically (keys 0600) and prints identities and paths; it must never print or log key material.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from sidecar.identity import cert_expiry_timestamp, write_atomically
from sidecar.pki import KeyPair, create_ca, issue_workload
from sidecar.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
WORKLOAD_CERT = "cert.pem"
WORKLOAD_KEY = "key.pem"
TRUST_ANCHORS = "ca.pem"

PROG = "python -m sidecar certs"


class CertsError(Exception):
    """A problem the user can fix; reported as one line on stderr with exit status 2."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertsError(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise CertsError(f"cannot read {what} {str(path)!r}: {e.strerror}") from e


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CertsError(f"cannot create directory {str(path)!r}: {e.strerror}") from e


def _expiry(cert_pem: bytes) -> str:
    ts = cert_expiry_timestamp(cert_pem)
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cmd_ca(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not args.force:
        raise CertsError(
            f"refusing to overwrite existing CA {', '.join(existing)} (use --force to replace it)"
        )
    ca = create_ca(trust_domain=args.trust_domain)
    _mkdir(directory)
    write_atomically(key_path, ca.key_pem, 0o600)
    write_atomically(cert_path, ca.cert_pem, 0o644)
    print(f"trust domain  spiffe://{args.trust_domain}")
    print(f"ca cert       {cert_path} (expires {_expiry(ca.cert_pem)})")
    print(f"ca key        {key_path}")


def _cmd_issue(args: argparse.Namespace) -> None:
    ca_dir, out = Path(args.ca_dir), Path(args.out)
    if not (ca_dir / CA_CERT).exists() and not (ca_dir / CA_KEY).exists():
        raise CertsError(f"no CA in {str(ca_dir)!r}; create one with `{PROG} ca --dir {ca_dir}`")
    ca_cert = _read(ca_dir / CA_CERT, "CA certificate")
    ca_key = _read(ca_dir / CA_KEY, "CA key")
    if args.hours <= 0:
        raise CertsError(f"--hours must be positive, got {args.hours:g}")
    identity = SpiffeId(args.trust_domain, args.namespace, args.service_account)
    issued = issue_workload(
        KeyPair(ca_cert, ca_key),
        identity=identity,
        lifetime=datetime.timedelta(hours=args.hours),
        dns_names=tuple(args.dns),
    )
    _mkdir(out)
    cert_path, key_path, anchors_path = out / WORKLOAD_CERT, out / WORKLOAD_KEY, out / TRUST_ANCHORS
    write_atomically(key_path, issued.key_pem, 0o600)
    write_atomically(cert_path, issued.cert_pem, 0o644)
    write_atomically(anchors_path, ca_cert, 0o644)
    print(f"identity      {identity}")
    print(f"cert chain    {cert_path} (expires {_expiry(issued.cert_pem)})")
    print(f"key           {key_path}")
    print(f"trust anchors {anchors_path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Mesh CA and workload certificates in files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ca,issue}")

    ca = sub.add_parser("ca", help="create a mesh root CA (ca.pem, ca-key.pem)")
    ca.add_argument("--dir", required=True, help="directory for ca.pem and ca-key.pem")
    ca.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    ca.set_defaults(run=_cmd_ca)

    issue = sub.add_parser("issue", help="issue a workload certificate (cert.pem, key.pem, ca.pem)")
    issue.add_argument("--ca-dir", required=True, help="directory holding ca.pem and ca-key.pem")
    issue.add_argument("--namespace", required=True)
    issue.add_argument("--service-account", required=True)
    issue.add_argument("--out", required=True, help="directory for cert.pem, key.pem and ca.pem")
    issue.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain")
    issue.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="extra DNS SAN (repeatable)"
    )
    issue.add_argument("--hours", type=float, default=24.0, help="lifetime in hours (default 24)")
    issue.set_defaults(run=_cmd_issue)
    return parser


def main(argv: list[str]) -> int:
    """Run `certs <argv>` (argv excludes the word `certs`); 0 on success, 2 on a usage or input error."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        # argparse exits on --help (0) and usage errors (2, after printing them); main reports, never exits.
        return e.code if isinstance(e.code, int) else 2
    try:
        args.run(args)
    except (CertsError, IdentityError) as e:
        print(f"certs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"certs: error: {e}", file=sys.stderr)
        return 2
    return 0
