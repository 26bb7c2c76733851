"""``kamal-proxy rollout deploy|set|stop``: manage a service's rollout targets (SPEC §3.7)."""

from __future__ import annotations

from kamal_proxy.cli.command import CobraCommand, Invocation, Spec, exact_args
from kamal_proxy.cli.deploy import target_flags, timeout_flags
from kamal_proxy.cli.flags import INT, STRING_SLICE, Flag


def _run_deploy(inv: Invocation) -> None:
    from kamal_proxy.cli.progress import send_deploy
    from kamal_proxy.control import commands

    send_deploy(
        inv,
        commands.RolloutDeploy,
        service=inv.args[0],
        targets=list(inv["target"]),
        readers=list(inv["read-target"]),
        deploy_timeout=inv["deploy-timeout"],
        drain_timeout=inv["drain-timeout"],
    )


def _run_set(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(
        commands.RolloutSet,
        service=inv.args[0],
        percentage=inv["percent"],
        allowlist=list(inv["list"]),
    )


def _run_stop(inv: Invocation) -> None:
    from kamal_proxy.control import commands

    inv.send(commands.RolloutStop, service=inv.args[0])


def rollout_command() -> CobraCommand:
    deploy = CobraCommand(
        "deploy",
        Spec(
            use="deploy <service>",
            short="Deploy the rollout target",
            flags=[*target_flags(), *timeout_flags()],
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
