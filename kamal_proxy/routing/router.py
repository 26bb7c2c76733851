"""The Router: the one owner of routing state, and the deploy/remove orchestration (SPEC §13).

Control commands mutate it; the routing resource reads ``router.table`` on every request.  The
reactor thread is the lock: a deploy swaps the table and the service's active balancer in one
synchronous step, so a request sees either the old configuration or the new one.

With worker processes, ``replicas`` (see ``routing/replication.py``) carries every change to
the workers' copies: a command returns only once every worker applied it, and drains wait for
the workers' requests in flight too.  Without workers it is None and nothing else happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from kamal_proxy.durations import format_duration
from kamal_proxy.observe.events import debug, error, info
from kamal_proxy.routing import state as statefile
from kamal_proxy.routing.balancer import LoadBalancer, retire_when_idle
from kamal_proxy.routing.pause import PauseController
from kamal_proxy.routing.progress import DeployObserver
from kamal_proxy.routing.replication import Replicas
from kamal_proxy.routing.rollout import split_point
from kamal_proxy.routing.service import PauseState, Service
from kamal_proxy.routing.table import RoutingTable
from kamal_proxy.routing.target import HealthCheckFactory, PoolFactory, Target
from kamal_proxy.service_options import (
    OptionsError,
    ServiceOptions,
    TargetOptions,
    validate_service_options,
)

CONFLICT_MESSAGE = "host is used by another service"


class RouterError(Exception):
    """A command failed; ``str()`` is what the CLI prints after ``Error: ``."""


class Router:
    def __init__(
        self,
        reactor: IReactorTime,
        state_path: str | None,
        pool_factory: PoolFactory,
        service_setup: Callable[[Service], None] | None = None,
        health_check_factory: HealthCheckFactory | None = None,
    ) -> None:
        self.reactor = reactor
        self.state_path = state_path
        self.services: dict[str, Service] = {}
        # Given from above (``app``): routing imports neither the proxy nor the health checks.
        # Without a health check factory targets are never checked (tests report by hand).
        self._pool_factory = pool_factory
        self._health_check_factory = health_check_factory
        # Builds per-service extras (certificates, error pages); raises RouterError to refuse.
        self._service_setup = service_setup
        self.table: RoutingTable = RoutingTable.build([], "")
        #: The workers' copies of this state (None: this process serves the traffic itself).
        self.replicas: Replicas | None = None

    # -- reading ----------------------------------------------------------

    def lookup(self, host: str, path: str):
        return self.table.lookup(host, path)

    def list_services(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, service in self.services.items():
            lb = service.active
            out[name] = {
                "host": ",".join(service.options.hosts) or "*",
                "path": ",".join(service.options.path_prefixes),
                "tls": service.options.tls_enabled,
                "target": ",".join(t.address for t in lb.targets) if lb else "",
                "state": service.state_name,
            }
        return out

    # -- building ---------------------------------------------------------

    def _balancer(
        self,
        targets: list[str],
        readers: list[str],
        options: ServiceOptions,
        target_options: TargetOptions,
    ) -> LoadBalancer:
        try:
            writers = [self._target(a, target_options) for a in targets]
            read = [self._target(a, target_options) for a in readers]
        except OptionsError as e:
            raise RouterError(str(e)) from None
        lb = LoadBalancer(
            writers,
            read,
            options.writer_affinity_timeout,
            options.read_targets_accept_websockets,
        )
        lb.on_health_change = self._health_changed
        return lb

    def _target(self, address: str, target_options: TargetOptions) -> Target:
        return Target(
            self.reactor, address, target_options, self._pool_factory, self._health_check_factory
        )

    def _health_changed(self, lb: LoadBalancer, target: Target) -> defer.Deferred | None:
        if self.replicas is not None:
            return self.replicas.health(lb, target)
        return None

    async def _publish(self, *names: str, removed: tuple[str, ...] = ()) -> None:
        """Wait until every worker applied the current state of ``names`` (and removals)."""
        if self.replicas is not None:
            await self.replicas.publish(self, list(names), list(removed))

    async def _drain(self, balancers: list[LoadBalancer], drain_timeout: int) -> None:
        """Let the requests in flight on ``balancers`` finish here and in every worker."""
        waits = [lb.drain(drain_timeout / 1e9) for lb in balancers]
        if self.replicas is not None:
            waits.append(self.replicas.drain(balancers, drain_timeout))
        await defer.gatherResults(waits, consumeErrors=True)

    def _retire(self, lb: LoadBalancer) -> None:
        lb.retire()
        self._retired(lb)

    def _retired(self, lb: LoadBalancer) -> None:
        if self.replicas is not None:
            self.replicas.retire([lb])

    def _rebuild_table(self) -> None:
        self.table = RoutingTable.build(list(self.services.values()), self.table.default_tls_host)

    # -- commands ---------------------------------------------------------

    async def deploy(
        self,
        name: str,
        targets: list[str],
        readers: list[str],
        deploy_timeout: int,
        drain_timeout: int,
        force: bool,
        options: ServiceOptions,
        target_options: TargetOptions,
        observer: DeployObserver | None = None,
    ) -> None:
        """Deploy ``targets`` for service ``name`` (SPEC §13.1); ``observer`` is told of the
        health checks it waits for and of the drain."""
        try:
            validate_service_options(options)
        except OptionsError as e:
            raise RouterError(str(e)) from None
        if target_options.health_check_config.interval <= 0:
            raise RouterError("health check interval must be greater than zero")
        options = options.normalized()
        attrs = {
            "service": name,
            "targets": list(targets),
            "hosts": list(options.hosts),
            "paths": list(options.path_prefixes),
            "tls": options.tls_enabled,
        }
        info("Deploying", **attrs)

        lb = self._balancer(targets, readers, options, target_options)
        lb.start()
        if not force:
            await self._wait_healthy(lb, deploy_timeout, observer)

        try:
            previous = self._install(name, options, target_options, lb, slot="active")
        except RouterError:
            lb.retire()
            self.save()
            raise
        self.save()
        await self._publish(name)
        if previous is not None:
            await self._drain_and_retire(previous, drain_timeout, observer)
        info("Deployed", **attrs)

    async def _wait_healthy(
        self, lb: LoadBalancer, timeout: int, observer: DeployObserver | None = None
    ) -> None:
        waiting = lb.wait_healthy()
        timer = self.reactor.callLater(max(timeout, 0) / 1e9, waiting.cancel)
        if observer is not None:
            for target in lb.targets:
                target.on_check = lambda t, reason: observer.health_checked(t.address, reason)
        try:
            await waiting
        except defer.CancelledError:
            lb.retire()
            raise RouterError(
                "target failed to become healthy within configured timeout "
                f"({format_duration(timeout)})"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
            for target in lb.targets:
                target.on_check = None

    def _install(
        self,
        name: str,
        options: ServiceOptions,
        target_options: TargetOptions,
        lb: LoadBalancer,
        slot: str,
    ) -> LoadBalancer | None:
        """Conflict check, service update and the switch, all in one reactor turn."""
        other = self.table.conflicting_service(name, options)
        if other is not None:
            error("Host settings conflict with another service", service=other.name)
            raise RouterError(CONFLICT_MESSAGE)

        service = self.services.get(name)
        candidate = Service(name, options, target_options)
        if self._service_setup is not None:
            self._service_setup(candidate)  # may raise RouterError: nothing changed yet
        if service is None:
            service = candidate
            self.services[name] = service
        else:
            service.set_options(options, target_options)
            service.error_pages = candidate.error_pages
            service.certificates = candidate.certificates
        previous = getattr(service, slot)
        setattr(service, slot, lb)
        self._rebuild_table()
        return previous

    async def _drain_and_retire(
        self, lb: LoadBalancer, drain_timeout: int, observer: DeployObserver | None = None
    ) -> None:
        lb.stop()
        addresses = [t.address for t in lb.targets]
        if observer is not None:
            observer.draining(addresses, drain_timeout)
        try:
            await self._drain([lb], drain_timeout)
        finally:
            self._retire(lb)
        if observer is not None:
            observer.drained(addresses)

    async def remove(self, name: str) -> None:
        service = self.services.pop(name, None)
        if service is None:
            self.save()
            raise RouterError("service not found")
        for lb in service.balancers():
            lb.stop()
        self._rebuild_table()
        self.save()
        # In-flight requests are left to finish on their own (SPEC §13.4); idle upstream
        # connections go once they are done (workers do the same with their copies).
        for lb in service.balancers():
            self.reactor.callLater(0, retire_when_idle, self.reactor, lb, then=self._retired)
        await self._publish(removed=(name,))

    async def pause(self, name: str, drain_timeout: int, pause_timeout: int) -> None:
        await self._hold(name, drain_timeout, "Service paused", lambda p: p.pause(pause_timeout))

    async def stop(self, name: str, drain_timeout: int, message: str) -> None:
        await self._hold(name, drain_timeout, "Service stopped", lambda p: p.stop(message))

    async def _hold(
        self, name: str, drain_timeout: int, event: str, change: Callable[[PauseController], None]
    ) -> None:
        """Pause or stop: change the state, drain what is in flight, then save (SPEC §14)."""
        try:
            service = self.get(name)
            change(service.pause)
            info(event, service=name)
            await self._publish(name)
            await self._drain_service(service, drain_timeout)
        finally:
            self.save()

    async def resume(self, name: str) -> None:
        try:
            service = self.get(name)
            service.pause.resume()
            info("Service resumed", service=name)
            await self._publish(name)
        finally:
            self.save()

    async def rollout_deploy(
        self,
        name: str,
        targets: list[str],
        readers: list[str],
        deploy_timeout: int,
        drain_timeout: int,
        observer: DeployObserver | None = None,
    ) -> None:
        service = self.get(name)
        info("Deploying for rollout", service=name, targets=list(targets))
        lb = self._balancer(targets, readers, service.options, service.target_options)
        lb.start()
        await self._wait_healthy(lb, deploy_timeout, observer)
        service = self.get(name)
        previous, service.rollout = service.rollout, lb
        self.save()
        await self._publish(name)
        if previous is not None:
            await self._drain_and_retire(previous, drain_timeout, observer)
        info("Deployed for rollout", service=name, targets=list(targets))

    async def rollout_set(self, name: str, percentage: int, allowlist: list[str]) -> None:
        try:
            service = self.get(name)
            if service.rollout is None:
                raise RouterError("rollout target not set")
            service.rollout_split = {
                "percentage": percentage,
                "percentage_split_point": split_point(percentage),
                "allowlist": list(allowlist),
            }
            info("Set rollout split", service=name, percentage=percentage, allowlist=allowlist)
            await self._publish(name)
        finally:
            self.save()

    async def rollout_stop(self, name: str) -> None:
        try:
            service = self.get(name)
            service.rollout_split = None
            info("Stopped rollout", service=name)
            await self._publish(name)
        finally:
            self.save()

    async def _drain_service(self, service: Service, drain_timeout: int) -> None:
        await self._drain(service.balancers(), drain_timeout)
        info("Service drained", service=service.name)

    def get(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            raise RouterError("service not found")
        return service

    # -- persistence ------------------------------------------------------

    def snapshot(self) -> list[statefile.ServiceState]:
        states = []
        for service in self.services.values():
            active, rollout = service.active, service.rollout
            states.append(
                statefile.ServiceState(
                    name=service.name,
                    options=service.options,
                    target_options=service.target_options,
                    active_targets=active.writer_addresses if active else [],
                    active_readers=active.reader_addresses if active else [],
                    rollout_targets=rollout.writer_addresses if rollout else None,
                    rollout_readers=rollout.reader_addresses if rollout else None,
                    pause_state=int(service.pause.state),
                    stop_message=service.pause.stop_message,
                    fail_after=service.pause.fail_after,
                    rollout=service.rollout_split,
                )
            )
        return states

    def save(self) -> None:
        if self.state_path is None:
            return
        try:
            statefile.save(self.state_path, self.snapshot())
        except Exception as e:  # noqa: BLE001 - a failed save must not fail the command
            error("Unable to save state", error=str(e), path=self.state_path)
            return
        debug("Saved state", path=self.state_path)

    def restore(self) -> None:
        """Rebuild every saved service at once, all healthy (SPEC §15.3); all or nothing."""
        path = self.state_path
        if path is None:
            return
        try:
            states = statefile.load(path)
        except statefile.StateReadError as e:
            error("Failed to restore saved state", path=path, error=str(e))
            return
        except statefile.StateError as e:
            error("Failed to decode saved state", path=path, error=str(e))
            return
        if states is None:
            info("No previous state to restore", path=path)
            return
        try:
            services = [self._rebuild(s) for s in states]
        except (RouterError, OptionsError) as e:
            error("Failed to restore saved state", path=path, error=str(e))
            return
        for service in services:
            self.services[service.name] = service
            for lb in service.balancers():
                lb.start()
                lb.mark_all_healthy()
        self._rebuild_table()
        info("Restored saved state", path=path)

    def _rebuild(self, saved: statefile.ServiceState) -> Service:
        options = saved.options.normalized()
        service = Service(saved.name, options, saved.target_options)
        if self._service_setup is not None:
            self._service_setup(service)
        service.active = self._balancer(
            saved.active_targets, saved.active_readers, options, saved.target_options
        )
        if saved.rollout_targets or saved.rollout_readers:
            service.rollout = self._balancer(
                saved.rollout_targets or [],
                saved.rollout_readers or [],
                options,
                saved.target_options,
            )
        # A service saved paused is restored exactly as if paused now (never the Go crash).
        service.pause.state = PauseState(saved.pause_state or 0)
        service.pause.stop_message = saved.stop_message
        service.pause.fail_after = saved.fail_after
        service.rollout_split = saved.rollout
        return service
