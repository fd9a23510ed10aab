"""Names of the objects Baton creates for an LLMService, and label values derived from names.

An LLMService is a custom resource, so its name is a DNS-1123 *subdomain* (up to 253 characters, dots
allowed). Its children are stricter: Service names are DNS-1035 *labels* (at most 63 characters, lowercase
letters, digits and `-`, starting with a letter, ending with a letter or digit), and label values are at most
63 characters. Baton uses one rule for all of them:

* If `<name><suffix>` already is a valid DNS-1035 label, it is used as is (the common case: every name in
  the examples and tests stays readable and predictable).
* Otherwise the name is sanitised (lowercased, characters outside `[a-z0-9-]` become `-`, a leading
  non-letter gets an `x` in front), truncated so that `-<hash8><suffix>` still fits in 63 characters, and an
  8-hex-digit hash of the *original* name is appended before the suffix. The hash keeps two long names
  that share a prefix apart; the result is deterministic, so the reconciler always finds its children again.

We chose truncate-with-hash over refusing long names because the CRD cannot express the limit precisely
(it depends on the longest suffix) and a name that works for the LLMService itself should work for its
children. The admission webhook may still warn about names longer than `READABLE_NAME_MAX`, the longest
name whose children all keep the readable form.

Pure: no I/O.
"""
from __future__ import annotations

import hashlib
import re

#: Kubernetes' limit for DNS-1035 labels (Service names) and label values.
DNS_LABEL_MAX = 63
#: Length of the hash appended to shortened names.
HASH_LEN = 8

#: Suffixes of the children; `""` is the router Service / ServiceAccount (named like the LLMService).
SUFFIX_PREFILL = "-prefill"
SUFFIX_DECODE = "-decode"
SUFFIX_ROUTER = "-router"
SUFFIX_CONFIG = "-config"
ALL_SUFFIXES = ("", SUFFIX_PREFILL, SUFFIX_DECODE, SUFFIX_ROUTER, SUFFIX_CONFIG)

#: Longest LLMService name whose children all keep the plain, readable `<name>-<suffix>` form.
READABLE_NAME_MAX = DNS_LABEL_MAX - max(len(s) for s in ALL_SUFFIXES)

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def short_hash(text: str, length: int = HASH_LEN) -> str:
    """First `length` hex digits of the SHA-256 of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def is_dns_label(text: str) -> bool:
    """Whether `text` is a valid DNS-1035 label (what Kubernetes requires of Service names)."""
    return len(text) <= DNS_LABEL_MAX and bool(_DNS_1035.match(text))


def child_name(name: str, suffix: str = "") -> str:
    """Name of the child `<name><suffix>`, shortened with a hash when it would not be a valid DNS-1035 label.

    `suffix` is appended verbatim (it must itself be `-` followed by lowercase letters/digits, or empty).
    """
    plain = f"{name}{suffix}"
    if is_dns_label(plain):
        return plain
    base = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if not base or not base[0].isalpha():
        base = "x" + base
    room = DNS_LABEL_MAX - len(suffix) - 1 - HASH_LEN
    base = base[:room].rstrip("-") or "x"
    return f"{base}-{short_hash(name)}{suffix}"


def label_value(value: str) -> str:
    """`value` as a label value: unchanged when it fits in 63 characters, else shortened with a hash.

    LLMService names are DNS subdomains (lowercase alphanumerics, `-` and `.`, alphanumeric at both ends),
    which are valid label values apart from the length.
    """
    if len(value) <= DNS_LABEL_MAX:
        return value
    room = DNS_LABEL_MAX - 1 - HASH_LEN
    head = value[:room].rstrip("-.") or "x"
    return f"{head}-{short_hash(value)}"


def service_account_name(name: str) -> str:
    return child_name(name)


def config_map_name(name: str) -> str:
    return child_name(name, SUFFIX_CONFIG)


def role_name(name: str, role: str) -> str:
    """Deployment and headless Service of a worker role (`prefill` or `decode`)."""
    return child_name(name, f"-{role}")


def router_deployment_name(name: str) -> str:
    return child_name(name, SUFFIX_ROUTER)


def router_service_name(name: str) -> str:
    """The client-facing Service: named like the LLMService, so the endpoint is `http://<name>.<ns>`."""
    return child_name(name)


#: The KV-transfer secret `<name>-kv`, key `token` (made by the operator, see kv_secret.py); the worker pods'
#: BATON_KV_SECRET refers to it.
KV_SECRET_SUFFIX = "-kv"
KV_SECRET_KEY = "token"


def kv_secret_name(name: str, rotation: str = "") -> str:
    """`<name>-kv`, or `<name>-kv-<hash of the rotation value>` once a rotation was asked for: a rotated secret
    is a new object, so the operator only ever creates Secrets (it can read none)."""
    if not rotation:
        return child_name(name, KV_SECRET_SUFFIX)
    import hashlib

    return child_name(name, f"{KV_SECRET_SUFFIX}-{hashlib.sha256(rotation.encode()).hexdigest()[:8]}")
