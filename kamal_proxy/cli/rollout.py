"""``kamal-proxy rollout deploy|set|stop``: manage a service's rollout targets (SPEC §3.7)."""

from __future__ import annotations

from kamal_proxy.cli.command import CobraCommand, Invocation, Spec, exact_args
from kamal_proxy.cli.flags import DURATION, INT, STRING_SLICE, Flag
from kamal_proxy.control import commands
from kamal_proxy.routing.options import DEFAULT_DEPLOY_TIMEOUT, DEFAULT_DRAIN_TIMEOUT


def _run_deploy(inv: Invocation) -> None:
    inv.send(
        commands.RolloutDeploy,
        service=inv.args[0],
        targets=list(inv["target"]),
        readers=list(inv["read-target"]),
        deploy_timeout=inv["deploy-timeout"],
        drain_timeout=inv["drain-timeout"],
    )


def _run_set(inv: Invocation) -> None:
    inv.send(
        commands.RolloutSet,
        service=inv.args[0],
        percentage=inv["percent"],
        allowlist=list(inv["list"]),
    )


def _run_stop(inv: Invocation) -> None:
    inv.send(commands.RolloutStop, service=inv.args[0])


def rollout_command() -> CobraCommand:
    deploy = CobraCommand(
        "deploy",
        Spec(
            use="deploy <service>",
            short="Deploy the rollout target",
            flags=[
                Flag("target", STRING_SLICE, [], "Target host(s) to deploy"),
                Flag("read-target", STRING_SLICE, [], "Read-only target host(s) to deploy"),
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
                    "Maximum time to allow existing connections to drain before removing old "
                    "target",
                ),
            ],
            args=exact_args(1),
            run=_run_deploy,
            required=("target",),
        ),
    )
    set_ = CobraCommand(
        "set",
        Spec(
            use="set <service>",
            short="Set traffic split for rollout",
            flags=[
                Flag("percent", INT, 0, "Percentage of traffic to send to the new target"),
                Flag("list", STRING_SLICE, [], "Rollout to specific values"),
            ],
            args=exact_args(1),
            run=_run_set,
            one_required=(("percent", "list"),),
        ),
    )
    stop = CobraCommand(
        "stop",
        Spec(
            use="stop <service>",
            short="Stops rollout of a service",
            args=exact_args(1),
            run=_run_stop,
        ),
    )
    return CobraCommand(
        "rollout",
        Spec(use="rollout", short="Manage rollout settings"),
        children=[deploy, set_, stop],
    )
