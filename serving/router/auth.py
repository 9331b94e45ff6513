"""API keys, the tenant each speaks for, and per-key rate limits.

Keys come from a file (in a cluster, a Secret mounted as a file), one per line:

    # comment
    sk-team-a                    # default limits (--rate-limit-rps / --rate-limit-burst)
    sk-team-b  rps=2 burst=5     # its own limit
    sk-batch   rps=0             # unlimited
    sk-acme-1  tenant=acme       # keys of one tenant share its templates
    sk-acme-2  tenant=acme

A key's tenant owns what the key creates (templates), and only keys of that tenant see it
(`serving.worker_auth`). A key without `tenant=` is a tenant of its own, named after the
key's digest (`key-1a2b3c4d`), so two keys never share by accident.

Keys are kept only as SHA-256 digests, so a lookup compares digests, not secrets, and a
heap dump does not hold them. The token bucket is pure (callers pass `now`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from stepfleet.serving.worker_auth import TENANT_PATTERN


class KeysFileError(ValueError):
    pass


@dataclass(frozen=True)
class KeySpec:
    name: str  # a short, non-secret label for logs and metrics
    rps: float | None
    burst: float | None
    #: Who owns what this key creates (its own name unless the file says `tenant=`).
    tenant: str = ""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, default_rps: float | None = None, default_burst: float | None = None) -> dict[str, KeySpec]:
    """Key digest → its limits; a malformed line is an error naming its line number."""
    keys: dict[str, KeySpec] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *opts = line.split()
        rps, burst = default_rps, default_burst
        name_of_key = f"key-{digest(key)[:8]}"
        tenant = name_of_key
        for opt in opts:
            name, sep, value = opt.partition("=")
            if name == "tenant" and sep:
                if not TENANT_PATTERN.fullmatch(value):
                    raise KeysFileError(f"api keys file line {lineno}: tenant must be 1-128 letters, digits or "
                                        f"'._:@-' (starting with a letter or digit), got {value!r}")
                tenant = value
                continue
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not sep or name not in ("rps", "burst") or number < 0:
                raise KeysFileError(f"api keys file line {lineno}: expected rps=N, burst=N or tenant=NAME, "
                                    f"got {opt!r}")
            if name == "rps":
                rps = number or None
            else:
                burst = number or None
        keys[digest(key)] = KeySpec(name=name_of_key, rps=rps, burst=burst, tenant=tenant)
    return keys


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass
class TokenBucket:
    """`rps` tokens per second, at most `burst` saved; one token per request."""

    rps: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def take(self, now: float) -> float:
        """0.0 when allowed (and a token is spent), else seconds until a token is available."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rps)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rps


class RateLimiter:
    """One bucket per key digest; buckets reset when a key's limits change."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[KeySpec, TokenBucket]] = {}

    def check(self, key_digest: str, spec: KeySpec, now: float) -> float:
        if spec.rps is None:
            return 0.0
        entry = self._buckets.get(key_digest)
        if entry is None or entry[0] != spec:
            entry = (spec, TokenBucket(spec.rps, spec.burst or max(1.0, spec.rps)))
            self._buckets[key_digest] = entry
        return entry[1].take(now)
