"""One deployed service: its options, its active (and rollout) load balancer, its pause state."""

from __future__ import annotations

from typing import Any

from kamal_proxy.routing.balancer import LoadBalancer
from kamal_proxy.routing.pause import PauseController, PauseState
from kamal_proxy.service_options import ServiceOptions, TargetOptions

__all__ = ["PauseState", "Service"]


class Service:
    """Everything a request needs to know about where it goes, computed at deploy time."""

    def __init__(self, name: str, options: ServiceOptions, target_options: TargetOptions) -> None:
        self.name = name
        self.active: LoadBalancer | None = None
        self.rollout: LoadBalancer | None = None
        self.rollout_split: dict[str, Any] | None = None
        self.pause = PauseController()
        self.error_pages: Any = None
        self.certificates: Any = None
        self.set_options(options, target_options)

    def set_options(self, options: ServiceOptions, target_options: TargetOptions) -> None:
        self.options = options
        self.target_options = target_options
        hc = target_options.health_check_config
        self.health_check_path = hc.path
        self.exclude_metrics_paths = frozenset(options.exclude_metrics_paths)
        self.client_ip_header = options.client_ip_header.lower().encode("latin-1")
        self.log_request_headers = list(target_options.log_request_headers)
        self.log_response_headers = list(target_options.log_response_headers)

    @property
    def state_name(self) -> str:
        return self.pause.name

    def balancers(self) -> list[LoadBalancer]:
        return [lb for lb in (self.active, self.rollout) if lb is not None]
