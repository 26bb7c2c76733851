"""Service and target options: one model for the CLI, the control plane, routing, health
checks, TLS and the state file.

It sits at the bottom of the layers (DESIGN §2), beside ``durations``, because all of those
read it and none may import another for it.

Field names and JSON layout follow the Go original's state file (SPEC §15.2) so that a state
file written by either program restores in the other.  Durations are integer nanoseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from kamal_proxy.durations import SECOND

ACME_PRODUCTION_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
ACME_STAGING_DIRECTORY = "https://acme-staging-v02.api.letsencrypt.org/directory"

DEFAULT_HEALTH_CHECK_PATH = "/up"
DEFAULT_HEALTH_CHECK_INTERVAL = 1 * SECOND
DEFAULT_HEALTH_CHECK_TIMEOUT = 5 * SECOND
DEFAULT_TARGET_TIMEOUT = 30 * SECOND
DEFAULT_DEPLOY_TIMEOUT = 30 * SECOND
DEFAULT_DRAIN_TIMEOUT = 30 * SECOND
DEFAULT_PAUSE_TIMEOUT = 30 * SECOND
DEFAULT_WRITER_AFFINITY_TIMEOUT = 1 * SECOND
DEFAULT_MAX_MEMORY_BUFFER_SIZE = 1 << 20


class OptionsError(ValueError):
    """An invalid option; ``str()`` is the exact message the user sees."""


def _list(value: Any) -> list[str]:
    return [str(v) for v in value] if value else []


@dataclass(slots=True)
class HealthCheckConfig:
    path: str = DEFAULT_HEALTH_CHECK_PATH
    port: int = 0
    interval: int = DEFAULT_HEALTH_CHECK_INTERVAL
    timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "port": self.port,
            "interval": self.interval,
            "timeout": self.timeout,
            "host": self.host,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HealthCheckConfig:
        """Missing keys take Go zero values, as the Go original's decoder does."""
        data = data or {}
        return cls(
            path=str(data.get("path") or ""),
            port=int(data.get("port") or 0),
            interval=int(data.get("interval") or 0),
            timeout=int(data.get("timeout") or 0),
            host=str(data.get("host") or ""),
        )


@dataclass(slots=True)
class ServiceOptions:
    hosts: list[str] = field(default_factory=list)
    path_prefixes: list[str] = field(default_factory=list)
    tls_enabled: bool = False
    tls_certificate_path: str = ""
    tls_private_key_path: str = ""
    tls_on_demand_url: str = ""
    tls_redirect: bool = True
    canonical_host: str = ""
    acme_directory: str = ""
    acme_cache_path: str = ""
    error_page_path: str = ""
    strip_prefix: bool = True
    writer_affinity_timeout: int = DEFAULT_WRITER_AFFINITY_TIMEOUT
    read_targets_accept_websockets: bool = False
    exclude_metrics_paths: list[str] = field(default_factory=list)
    client_ip_header: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = list(value) if value else None
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ServiceOptions:
        data = data or {}
        return cls(
            hosts=_list(data.get("hosts")),
            path_prefixes=_list(data.get("path_prefixes")),
            tls_enabled=bool(data.get("tls_enabled", False)),
            tls_certificate_path=str(data.get("tls_certificate_path") or ""),
            tls_private_key_path=str(data.get("tls_private_key_path") or ""),
            tls_on_demand_url=str(data.get("tls_on_demand_url") or ""),
            tls_redirect=bool(data.get("tls_redirect", False)),
            canonical_host=str(data.get("canonical_host") or ""),
            acme_directory=str(data.get("acme_directory") or ""),
            acme_cache_path=str(data.get("acme_cache_path") or ""),
            error_page_path=str(data.get("error_page_path") or ""),
            strip_prefix=bool(data.get("strip_prefix", False)),
            writer_affinity_timeout=int(data.get("writer_affinity_timeout") or 0),
            read_targets_accept_websockets=bool(data.get("read_targets_accept_websockets", False)),
            exclude_metrics_paths=_list(data.get("exclude_metrics_paths")),
            client_ip_header=str(data.get("client_ip_header") or ""),
        )

    def normalized(self) -> ServiceOptions:
        """A copy with hosts and path prefixes normalized (SPEC §6.1)."""
        copy = ServiceOptions.from_json(self.to_json())
        copy.hosts = normalize_hosts(self.hosts)
        copy.path_prefixes = normalize_path_prefixes(self.path_prefixes)
        return copy

    @property
    def has_configured_hosts(self) -> bool:
        return has_configured_hosts(self.hosts)

    @property
    def uses_static_certificate(self) -> bool:
        return bool(self.tls_certificate_path and self.tls_private_key_path)

    @property
    def uses_acme(self) -> bool:
        return self.tls_enabled and not self.uses_static_certificate


@dataclass(slots=True)
class TargetOptions:
    health_check_config: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    response_timeout: int = DEFAULT_TARGET_TIMEOUT
    buffer_requests: bool = False
    buffer_responses: bool = False
    max_memory_buffer_size: int = DEFAULT_MAX_MEMORY_BUFFER_SIZE
    max_request_body_size: int = 0
    max_response_body_size: int = 0
    log_request_headers: list[str] = field(default_factory=list)
    log_response_headers: list[str] = field(default_factory=list)
    forward_headers: bool = True
    scope_cookie_paths: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, HealthCheckConfig):
                value = value.to_json()
            elif isinstance(value, list):
                value = list(value) if value else None
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TargetOptions:
        data = data or {}
        return cls(
            health_check_config=HealthCheckConfig.from_json(data.get("health_check_config")),
            response_timeout=int(data.get("response_timeout") or 0),
            buffer_requests=bool(data.get("buffer_requests", False)),
            buffer_responses=bool(data.get("buffer_responses", False)),
            max_memory_buffer_size=int(data.get("max_memory_buffer_size") or 0),
            max_request_body_size=int(data.get("max_request_body_size") or 0),
            max_response_body_size=int(data.get("max_response_body_size") or 0),
            log_request_headers=_list(data.get("log_request_headers")),
            log_response_headers=_list(data.get("log_response_headers")),
            forward_headers=bool(data.get("forward_headers", False)),
            scope_cookie_paths=bool(data.get("scope_cookie_paths", False)),
        )


def normalize_hosts(hosts: list[str]) -> list[str]:
    """An empty host list means the catch-all host ``""``; otherwise hosts are kept verbatim."""
    return list(hosts) if hosts else [""]


def normalize_path_prefixes(prefixes: list[str]) -> list[str]:
    """``api`` and ``/api/`` both become ``/api``; nothing given means the root ``/``."""
    if not prefixes:
        return ["/"]
    return ["/" + p.strip("/") for p in prefixes]


def has_configured_hosts(hosts: list[str]) -> bool:
    return bool(hosts) and all(h != "" for h in hosts)


_TARGET_PATTERN = re.compile(r"^([A-Za-z0-9_][-_.A-Za-z0-9_+]+)(:[0-9]+)?\Z")


def validate_target_address(address: str) -> None:
    """Reject anything but ``host`` or ``host:port`` with the Go original's odd wording."""
    if not _TARGET_PATTERN.match(address):
        raise OptionsError(f"{address} :invalid host pattern")


def validate_service_options(options: ServiceOptions) -> None:
    """SPEC §3.6.4, in its order; run by the CLI before sending and by the server on receipt."""
    opts = options.normalized()
    try:
        _validate(opts)
    except OptionsError as e:
        raise OptionsError(f"service options invalid: {e}") from None


def _validate(opts: ServiceOptions) -> None:
    if opts.tls_on_demand_url and not opts.tls_enabled:
        raise OptionsError("TLS must be enabled to use a TLS on-demand URL")
    if opts.tls_enabled:
        if opts.tls_on_demand_url:
            if opts.has_configured_hosts:
                raise OptionsError("cannot set hosts when using a TLS on-demand URL")
            if opts.tls_certificate_path or opts.tls_private_key_path:
                raise OptionsError("cannot use a custom TLS certificate with a TLS on-demand URL")
            if opts.canonical_host:
                raise OptionsError("cannot set a canonical host when using a TLS on-demand URL")
            parse_on_demand_url(opts.tls_on_demand_url)
        elif not opts.has_configured_hosts:
            raise OptionsError("host must be set when using TLS")
        if "/" not in opts.path_prefixes:
            raise OptionsError("TLS settings must be specified on the root path service")
    if opts.canonical_host and opts.hosts[0] != "":
        if opts.canonical_host not in opts.hosts:
            raise OptionsError(
                f"canonical-host '{opts.canonical_host}' must be present in the hosts list: "
                f"[{' '.join(opts.hosts)}]"
            )


def parse_on_demand_url(url: str) -> tuple[str, str]:
    """Classify an on-demand URL as ``("local", url)`` or ``("external", url)`` (SPEC §16.4)."""
    if url.startswith("//"):
        raise OptionsError("tls-on-demand-url must be a path or an absolute http(s) URL")
    if url.startswith("/"):
        return "local", url
    if url.startswith("://") or url.startswith(":"):
        raise OptionsError(
            f'unable to parse tls-on-demand-url: parse "{url}": missing protocol scheme'
        )
    scheme, sep, _rest = url.partition(":")
    if not sep or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*$", scheme):
        raise OptionsError(
            f'unable to parse tls-on-demand-url: parse "{url}": invalid URI for request'
        )
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed "[" in the host
        raise OptionsError(f'unable to parse tls-on-demand-url: parse "{url}": {e}') from None
    if parts.scheme.lower() not in ("http", "https"):
        raise OptionsError(f'unsupported scheme "{parts.scheme}" in tls-on-demand-url')
    if not parts.netloc:
        raise OptionsError("missing host in tls-on-demand-url")
    return "external", url
