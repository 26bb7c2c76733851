"""The state file's key order, written out from SPEC §15.2: the oracle several tests share.

Kept apart from the product's own key lists on purpose, so a test compares the product
against the SPEC rather than against itself.
"""

SERVICE_KEYS = [
    "name",
    "options",
    "target_options",
    "active_targets",
    "active_readers",
    "rollout_targets",
    "rollout_readers",
    "pause_controller",
    "rollout_controller",
]
OPTION_KEYS = [
    "hosts",
    "path_prefixes",
    "tls_enabled",
    "tls_certificate_path",
    "tls_private_key_path",
    "tls_on_demand_url",
    "tls_redirect",
    "canonical_host",
    "acme_directory",
    "acme_cache_path",
    "error_page_path",
    "strip_prefix",
    "writer_affinity_timeout",
    "read_targets_accept_websockets",
    "exclude_metrics_paths",
    "client_ip_header",
]
TARGET_OPTION_KEYS = [
    "health_check_config",
    "response_timeout",
    "buffer_requests",
    "buffer_responses",
    "max_memory_buffer_size",
    "max_request_body_size",
    "max_response_body_size",
    "log_request_headers",
    "log_response_headers",
    "forward_headers",
    "scope_cookie_paths",
]
