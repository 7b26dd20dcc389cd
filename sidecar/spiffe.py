"""Workload identity values: the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and the
names inside it (trust domain, Kubernetes namespace and service account), parsed and checked in one place.

Pure values shared by the proxy and the control plane (webhook/ imports it): no I/O, no TLS, no key material.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_TRUST_DOMAIN: Final = "cluster.local"

# Every pattern below is used with fullmatch: `$` would also match before a trailing newline.
# SPIFFE ID spec §2.1: a trust domain is lowercase letters, digits, '.', '-', '_' (no port, no userinfo).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
# Kubernetes names: a namespace is an RFC 1123 label, a service account an RFC 1123 subdomain.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_NAMESPACE = re.compile(_LABEL)
_SERVICE_ACCOUNT = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_WORKLOAD_URI = re.compile(r"spiffe://(?P<td>[^/]*)/ns/(?P<ns>[^/]*)/sa/(?P<sa>[^/]*)")
_TRUST_DOMAIN_URI = re.compile(r"spiffe://(?P<td>[^/]+)/?")
_SERVICE_ACCOUNT_USER = "system:serviceaccount:"


class IdentityError(Exception):
    """An identity, certificate or TLS file that cannot be used; the message names the offending value."""


def is_trust_domain(text: str) -> bool:
    return _TRUST_DOMAIN.fullmatch(text) is not None


def is_dns_label(text: str) -> bool:
    """An RFC 1123 label: a Kubernetes namespace name, and the rule the mesh holds Service names to."""
    return _NAMESPACE.fullmatch(text) is not None


def is_service_account(text: str) -> bool:
    """A Kubernetes service account name (RFC 1123 subdomain)."""
    return len(text) <= 253 and _SERVICE_ACCOUNT.fullmatch(text) is not None


def trust_domain_of_uri(uri: str) -> str | None:
    """The trust domain of a trust-domain SPIFFE ID (`spiffe://<td>`, as a CA names its domain), else None."""
    m = _TRUST_DOMAIN_URI.fullmatch(uri)
    return m.group("td") if m else None


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not is_trust_domain(self.trust_domain):
            raise IdentityError(
                f"{self.trust_domain!r} is not a SPIFFE trust domain (lowercase a-z 0-9 . - _)"
            )
        if not is_dns_label(self.namespace):
            raise IdentityError(f"{self.namespace!r} is not a Kubernetes namespace name")
        if not is_service_account(self.service_account):
            raise IdentityError(f"{self.service_account!r} is not a Kubernetes service account name")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def username(self) -> str:
        """The Kubernetes user this service account's tokens authenticate as (what a TokenReview reports)."""
        return f"{_SERVICE_ACCOUNT_USER}{self.namespace}:{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The inverse of str(); anything else (query, port, extra segments, other scheme) is an IdentityError."""
        m = _WORKLOAD_URI.fullmatch(uri)
        if m is None:
            raise IdentityError(
                f"{uri!r} is not a SPIFFE workload ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
            )
        try:
            return cls(m.group("td"), m.group("ns"), m.group("sa"))
        except IdentityError as e:
            raise IdentityError(f"{uri!r} is not a SPIFFE workload ID: {e}") from e
