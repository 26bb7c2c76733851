"""``kamal-proxy deploy <service>``: build the options, validate them locally, send ``Deploy``.

Validation happens on the client first (SPEC §3.6.3) so mistakes are reported before anything
reaches the server; the server validates again because the socket can be used directly.
"""

from __future__ import annotations

from collections.abc import Mapping

from kamal_proxy.cli.command import CLIError, CobraCommand, Invocation, Spec, exact_args
from kamal_proxy.cli.flags import BOOL, DURATION, INT, INT64, STRING, STRING_SLICE, Flag
from kamal_proxy.options import default_acme_cache_path
from kamal_proxy.service_options import (
    ACME_STAGING_DIRECTORY,
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEALTH_CHECK_INTERVAL,
    DEFAULT_HEALTH_CHECK_PATH,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_MAX_MEMORY_BUFFER_SIZE,
    DEFAULT_TARGET_TIMEOUT,
    DEFAULT_WRITER_AFFINITY_TIMEOUT,
    HealthCheckConfig,
    OptionsError,
    ServiceOptions,
    TargetOptions,
    validate_service_options,
)


def target_flags() -> list[Flag]:
    """The targets of a deploy; shared with ``rollout deploy``."""
    return [
        Flag("target", STRING_SLICE, [], "Target host(s) to deploy"),
        Flag("read-target", STRING_SLICE, [], "Read-only target host(s) to deploy"),
    ]


def timeout_flags() -> list[Flag]:
    """How long a deploy waits for health and for the drain; shared with ``rollout deploy``."""
    return [
        Flag(
            "deploy-timeout",
            DURATION,
            DEFAULT_DEPLOY_TIMEOUT,
            "Maximum time to wait for the new target to become healthy",
        ),
        Flag(
            "drain-timeout",
            DURATION,
            DEFAULT_DRAIN_TIMEOUT,
            "Maximum time to allow existing connections to drain before removing old target",
        ),
    ]


def deploy_flags(acme_cache_path: str) -> list[Flag]:
    """SPEC §3.6.1, in the Go original's order."""
    return [
        *target_flags(),
        Flag("host", STRING_SLICE, [], "Host(s) to serve this target on (empty for wildcard)"),
        Flag("path-prefix", STRING_SLICE, [], "Deploy the service below the specified path(s)"),
        Flag(
            "strip-path-prefix",
            BOOL,
            True,
            "With --path-prefix, strip prefix from request before forwarding",
        ),
        Flag("tls", BOOL, False, "Configure TLS for this target (requires a non-empty host)"),
        Flag(
            "tls-on-demand-url",
            STRING,
            "",
            "Will make an HTTP request to the given URL, asking whether a host is allowed to "
            "have a certificate issued",
        ),
        Flag(
            "tls-staging",
            BOOL,
            False,
            "Use Let's Encrypt staging environment for certificate provisioning",
        ),
        Flag(
            "tls-certificate-path",
            STRING,
            "",
            "Configure custom TLS certificate path (PEM format)",
        ),
        Flag(
            "tls-private-key-path",
            STRING,
            "",
            "Configure custom TLS private key path (PEM format)",
        ),
        Flag("tls-acme-cache-path", STRING, acme_cache_path, "Location to store ACME assets"),
        Flag("tls-redirect", BOOL, True, "Redirect HTTP traffic to HTTPS"),
        Flag(
            "canonical-host",
            STRING,
            "",
            "Redirect all requests to this host (e.g., force root or www)",
        ),
        *timeout_flags(),
        Flag("force", BOOL, False, "Skip health checks and force deployment"),
        Flag(
            "health-check-interval",
            DURATION,
            DEFAULT_HEALTH_CHECK_INTERVAL,
            "Interval between health checks",
        ),
        Flag(
            "health-check-timeout",
            DURATION,
            DEFAULT_HEALTH_CHECK_TIMEOUT,
            "Time each health check must complete in",
        ),
        Flag("health-check-path", STRING, DEFAULT_HEALTH_CHECK_PATH, "Path to check for health"),
        Flag(
            "health-check-port",
            INT,
            0,
            "Port to check for health (default matches target port)",
        ),
        Flag(
            "health-check-host",
            STRING,
            "",
            "Host header to send with health check requests",
        ),
        Flag(
            "writer-affinity-timeout",
            DURATION,
            DEFAULT_WRITER_AFFINITY_TIMEOUT,
            "Time after a write before read requests will be routed to readers",
        ),
        Flag(
            "read-target-websockets",
            BOOL,
            False,
            "Route WebSocket traffic to read targets, when available",
        ),
        Flag(
            "target-timeout",
            DURATION,
            DEFAULT_TARGET_TIMEOUT,
            "Maximum time to wait for the target server to respond when serving requests",
        ),
        Flag("buffer-requests", BOOL, False, "Buffer requests before forwarding to target"),
        Flag("buffer-responses", BOOL, False, "Buffer responses before forwarding to client"),
        Flag("buffer-memory", INT64, DEFAULT_MAX_MEMORY_BUFFER_SIZE, "Max size of memory buffer"),
        Flag(
            "max-request-body",
            INT64,
            0,
            "Max size of request body when buffering (default of 0 means unlimited)",
        ),
        Flag(
            "max-response-body",
            INT64,
            0,
            "Max size of response body when buffering (default of 0 means unlimited)",
        ),
        Flag("error-pages", STRING, "", "Path to custom error pages"),
        Flag(
            "log-request-header",
            STRING_SLICE,
            [],
            "Additional request header to log (may be specified multiple times)",
        ),
        Flag(
            "log-response-header",
            STRING_SLICE,
            [],
            "Additional response header to log (may be specified multiple times)",
        ),
        Flag(
            "exclude-metrics-path",
            STRING_SLICE,
            [],
            "Request path(s) to exclude from Prometheus metrics (may be specified multiple times)",
        ),
        Flag(
            "forward-headers",
            BOOL,
            False,
            "Forward X-Forwarded headers to target (default false if TLS enabled; otherwise true)",
        ),
        Flag(
            "client-ip-header",
            STRING,
            "",
            "Request header containing the original client IP; used to populate "
            "X-Forwarded-For when present",
        ),
        Flag("scope-cookie-paths", BOOL, False, "Scope cookie paths to match path prefix"),
    ]


def service_options(inv: Invocation) -> ServiceOptions:
    """Flags -> ServiceOptions (SPEC §3.6.1 mapping)."""
    return ServiceOptions(
        hosts=list(inv["host"]),
        path_prefixes=list(inv["path-prefix"]),
        tls_enabled=inv["tls"],
        tls_certificate_path=inv["tls-certificate-path"],
        tls_private_key_path=inv["tls-private-key-path"],
        tls_on_demand_url=inv["tls-on-demand-url"],
        tls_redirect=inv["tls-redirect"],
        canonical_host=inv["canonical-host"],
        acme_directory=ACME_STAGING_DIRECTORY if inv["tls-staging"] else "",
        acme_cache_path=inv["tls-acme-cache-path"],
        error_page_path=inv["error-pages"],
        strip_prefix=inv["strip-path-prefix"],
        writer_affinity_timeout=inv["writer-affinity-timeout"],
        read_targets_accept_websockets=inv["read-target-websockets"],
        exclude_metrics_paths=list(inv["exclude-metrics-path"]),
        client_ip_header=inv["client-ip-header"],
    )


def target_options(inv: Invocation) -> TargetOptions:
    """Flags -> TargetOptions, with the ``--forward-headers`` default of SPEC §3.6.2."""
    forward_headers = inv["forward-headers"] if inv.changed("forward-headers") else not inv["tls"]
    return TargetOptions(
        health_check_config=HealthCheckConfig(
            path=inv["health-check-path"],
            port=inv["health-check-port"],
            interval=inv["health-check-interval"],
            timeout=inv["health-check-timeout"],
            host=inv["health-check-host"],
        ),
        response_timeout=inv["target-timeout"],
        buffer_requests=inv["buffer-requests"],
        buffer_responses=inv["buffer-responses"],
        max_memory_buffer_size=inv["buffer-memory"],
        max_request_body_size=inv["max-request-body"],
        max_response_body_size=inv["max-response-body"],
        log_request_headers=list(inv["log-request-header"]),
        log_response_headers=list(inv["log-response-header"]),
        forward_headers=forward_headers,
        scope_cookie_paths=inv["scope-cookie-paths"],
    )


def pre_run(inv: Invocation) -> None:
    """SPEC §3.6.3; "given" means present on the command line, whatever the value."""
    if inv.changed("max-request-body") and not inv.changed("buffer-requests"):
        raise CLIError("max-request-body can only be set when request buffering is enabled")
    if inv.changed("max-response-body") and not inv.changed("buffer-responses"):
        raise CLIError("max-response-body can only be set when response buffering is enabled")
    try:
        validate_service_options(service_options(inv))
    except OptionsError as e:
        raise CLIError(str(e)) from None


def run(inv: Invocation) -> None:
    import json

    from kamal_proxy.cli.progress import send_deploy
    from kamal_proxy.control import commands

    send_deploy(
        inv,
        commands.Deploy,
        service=inv.args[0],
        targets=list(inv["target"]),
        readers=list(inv["read-target"]),
        deploy_timeout=inv["deploy-timeout"],
        drain_timeout=inv["drain-timeout"],
        force=inv["force"],
        service_options=json.dumps(service_options(inv).to_json()),
        target_options=json.dumps(target_options(inv).to_json()),
    )


def deploy_command(environ: Mapping[str, str]) -> CobraCommand:
    # Resolved on every invocation, from the client's own HOME (SPEC §2.4, §21.1 #13).
    acme_cache_path = default_acme_cache_path(environ)
    return CobraCommand(
        "deploy",
        Spec(
            use="deploy <service>",
            short="Deploy a target host",
            flags=deploy_flags(acme_cache_path),
            args=exact_args(1),
            pre_run=pre_run,
            run=run,
            required=("target",),
            required_together=(("tls-certificate-path", "tls-private-key-path"),),
        ),
    )
