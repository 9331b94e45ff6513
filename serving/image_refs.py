"""Image references in JSON bodies: `data:` URLs always, remote `http(s)` URLs only when allowed.

OpenAI's JSON body for edits names its images as `{"image_url": ...}`: a base64 `data:` URL
or a URL the server fetches. A worker that fetches any URL a client names is a proxy into
the network it runs in (server-side request forgery): a cluster's metadata service
(169.254.169.254), its API server, the pod's own loopback. So remote URLs are off unless
the operator turns them on (`--remote-image-urls`), and then:

- the host is resolved *first* and every address it resolves to must be public: loopback,
  private (RFC 1918, ULA), link-local, multicast, reserved, unspecified and shared
  (100.64/10) addresses are refused unless inside `--remote-image-networks` (an allow list,
  for an in-cluster image store, and for tests on loopback);
- the connection goes to the address that was checked, not to a second DNS answer (the
  `Host` header and TLS SNI keep the name), so a name that resolves once to a public address
  and then to 127.0.0.1 (DNS rebinding) cannot slip through;
- no redirects are followed (a redirect could point anywhere);
- the body is read in chunks and dropped past `max_bytes`; the whole fetch, DNS included,
  has one time limit.

Pure parts (`parse_data_url`, `refusal`) take no I/O; `fetch` is the one place that does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Media types a `data:` URL may declare (what the worker decodes: `http.uploads.IMAGE_FORMATS`).
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
#: The shared address space of carrier-grade NAT, which `ipaddress` counts as neither private nor global.
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class ImageRefError(Exception):
    """A reference that cannot be used; `status` is the HTTP answer (400, 413 or 504), `code` its code."""

    def __init__(self, message: str, code: str = "invalid_image_url", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass(frozen=True)
class RemotePolicy:
    """Whether, and within which bounds, remote image URLs are fetched."""

    #: Off by default: fetching what a client names is a request forgery risk (module docstring).
    enabled: bool = False
    #: One limit for the whole fetch (DNS, connect, headers, body), in seconds.
    timeout_s: float = 10.0
    #: Most bytes read from a response body; more is 413 (the worker's upload limit).
    max_bytes: int = 32 * 1024**2
    #: Networks allowed although not public (an in-cluster image store; loopback in tests).
    allowed: tuple[IPNetwork, ...] = ()


def parse_networks(text: str | None) -> tuple[IPNetwork, ...]:
    """`"10.0.0.0/8, 127.0.0.1"` → networks; a ValueError names the entry that is not one."""
    out: list[IPNetwork] = []
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(out)


def parse_data_url(url: str) -> tuple[str, bytes]:
    """`data:image/png;base64,...` → (media type, bytes); `ImageRefError` when it is not a base64 image."""
    head, comma, payload = url.partition(",")
    if not comma or not head.lower().startswith("data:"):
        raise ImageRefError("is not a data: URL (data:image/png;base64,...)")
    meta = [p.strip().lower() for p in head[5:].split(";")]
    media, params = meta[0], meta[1:]
    if media not in IMAGE_MEDIA_TYPES:
        raise ImageRefError(f"the data URL is not an image (media type {media or 'missing'!r}; "
                            "send image/png, image/jpeg or image/webp)", code="invalid_image_format")
    if "base64" not in params:
        raise ImageRefError("the data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return media, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefError("the data URL's payload is not valid base64") from None


def refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why a fetch may not connect to `address` (None: it may): only public addresses, or allowed ones."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in allowed):
        return None
    for kind, test in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                       ("private", address.is_private), ("multicast", address.is_multicast),
                       ("unspecified", address.is_unspecified), ("reserved", address.is_reserved),
                       ("shared (carrier NAT)", address in _SHARED)):
        if test:
            return f"{address} is a {kind} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (a literal address resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


async def load(url: str, policy: RemotePolicy, resolver: Resolver = resolve) -> bytes:
    """The bytes a reference names: a `data:` URL's payload, or (when enabled) a fetched URL's body."""
    scheme = url.partition(":")[0].lower()
    if scheme == "data":
        return parse_data_url(url)[1]
    if scheme not in ("http", "https"):
        raise ImageRefError("must be a data: URL or an http(s) URL")
    if not policy.enabled:
        raise ImageRefError("remote image URLs are off on this server; send the image as a data: URL "
                            "(data:image/png;base64,...)", code="remote_urls_disabled")
    try:
        return await asyncio.wait_for(_fetch(url, policy, resolver), policy.timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise ImageRefError(f"fetching the URL took longer than {policy.timeout_s:g} s", code="fetch_timeout",
                            status=400) from None


async def _fetch(url: str, policy: RemotePolicy, resolver: Resolver) -> bytes:
    import httpx

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ImageRefError("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ImageRefError("the URL's port is not a number") from None
    try:
        addresses = await resolver(host, port)
    except OSError:
        raise ImageRefError(f"cannot resolve {host!r}", code="fetch_failed") from None
    if not addresses:
        raise ImageRefError(f"cannot resolve {host!r}", code="fetch_failed")
    for address in addresses:
        reason = refusal(address, policy.allowed)
        if reason:
            raise ImageRefError(f"refused to fetch from {host!r}: {reason} (only public addresses are fetched)",
                                code="url_not_allowed")
    pinned = httpx.URL(url).copy_with(host=str(addresses[0]))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    chunks: list[bytes] = []
    size = 0
    try:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout_s) as client:
            request = client.build_request("GET", pinned, headers={"Host": host_header, "Accept": "image/*"},
                                           extensions={"sni_hostname": host})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    raise ImageRefError(f"the URL answered a redirect ({response.status_code}); redirects are "
                                        "not followed", code="fetch_failed")
                if response.status_code != 200:
                    raise ImageRefError(f"the URL answered {response.status_code}", code="fetch_failed")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _too_large(policy.max_bytes)
                async for chunk in response.aiter_bytes():  # decoded: a gzip bomb counts its output
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise _too_large(policy.max_bytes)
                    chunks.append(chunk)
            finally:
                await response.aclose()
    except httpx.HTTPError as exc:
        raise ImageRefError(f"fetching the URL failed: {type(exc).__name__}", code="fetch_failed") from None
    return b"".join(chunks)


def _too_large(limit: int) -> ImageRefError:
    return ImageRefError(f"the fetched image exceeds the limit of {limit} bytes", code="image_too_large", status=413)
