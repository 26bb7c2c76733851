"""Cobra's command model on top of click.

click holds the command tree and runs the program (``Group.main``, ``echo``, ``CliRunner`` in
tests); everything users can observe (how a subcommand is found among flags, the order of
validation, the help layout and every error text) follows Cobra, because Kamal and people's
scripts were written against the Go original.  Each command declares one table of
:class:`~kamal_proxy.cli.flags.Flag` from which both parsing and help are generated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from kamal_proxy.cli.flags import BOOL, Flag, FlagError, FlagSet, go_quote

ROOT_NAME = "kamal-proxy"


class CLIError(click.ClickException):
    """Printed as ``Error: <message>`` on stderr, exit code 1 (Cobra's ``PrintErrln``)."""

    exit_code = 1


class UnknownCommandError(CLIError):
    """Cobra adds a pointer to the help of the command the search stopped at."""

    def __init__(self, message: str, command_path: str):
        super().__init__(message)
        self.command_path = command_path

    def show(self, file: Any = None) -> None:
        super().show(file)
        click.echo(f"Run '{self.command_path} --help' for usage.", err=True)


Transport = Callable[..., dict[str, Any]]


@dataclass
class Runtime:
    """Per-run context shared by all commands: the environment and the way to reach the server.

    ``transport(command, path, **arguments)`` performs one control-plane call; tests replace it.
    """

    environ: Mapping[str, str]
    transport: Transport


@dataclass
class Invocation:
    """What a command's run function gets: parsed flags, positionals and the runtime."""

    command: CobraCommand
    flags: FlagSet
    args: list[str]
    runtime: Runtime

    def __getitem__(self, name: str) -> Any:
        return self.flags[name]

    def changed(self, name: str) -> bool:
        return self.flags.is_changed(name)

    @property
    def environ(self) -> Mapping[str, str]:
        return self.runtime.environ

    def send(self, command: type, **arguments: Any) -> dict[str, Any]:
        """One control-plane call; a failure becomes ``Error: <message>``."""
        from kamal_proxy.options import socket_path

        try:
            return self.runtime.transport(command, socket_path(self.environ), **arguments)
        except Exception as e:
            from kamal_proxy.control.client import ControlError

            if isinstance(e, ControlError):
                raise CLIError(str(e)) from None
            raise


RunFunction = Callable[[Invocation], "int | None"]
ArgsValidator = Callable[["CobraCommand", list[str]], None]


@dataclass
class Spec:
    """The Cobra facets of a command that click has no notion of."""

    use: str
    short: str
    long: str = ""
    flags: Sequence[Flag] = ()
    run: RunFunction | None = None
    pre_run: RunFunction | None = None
    args: ArgsValidator | None = None
    aliases: Sequence[str] = ()
    hidden: bool = False
    required: Sequence[str] = ()
    required_together: Sequence[Sequence[str]] = ()
    one_required: Sequence[Sequence[str]] = ()


class CobraCommand(click.Group):
    """A click group (possibly without children) that behaves as a Cobra command.

    Every node is a group so that leaves and branches share one type; a leaf simply has no
    subcommands.  Only the root is entered through click; it finds the target command and
    executes it the Cobra way.
    """

    def __init__(self, name: str, spec: Spec, children: Sequence[CobraCommand] = ()):
        super().__init__(
            name=name,
            help=spec.short,
            hidden=spec.hidden,
            add_help_option=False,
            context_settings={
                "ignore_unknown_options": True,
                "allow_extra_args": True,
                "help_option_names": [],
            },
        )
        self.spec = spec
        self.parent: CobraCommand | None = None
        self.runtime: Runtime | None = None  # set on the root
        for child in children:
            self.add_child(child)

    def add_child(self, child: CobraCommand) -> None:
        child.parent = self
        self.add_command(child, child.name)

    # -- click entry ---------------------------------------------------------------------------

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return []

    def invoke(self, ctx: click.Context) -> Any:
        code = execute_root(self, ctx.args)
        if code:
            raise click.exceptions.Exit(code)
        return None

    # -- Cobra accessors -----------------------------------------------------------------------

    @property
    def children(self) -> list[CobraCommand]:
        """Sorted by name, as Cobra's ``Commands()``."""
        return sorted(self.commands.values(), key=lambda c: c.name)  # type: ignore[arg-type,return-value]

    @property
    def runnable(self) -> bool:
        return self.spec.run is not None

    @property
    def available(self) -> bool:
        if self.spec.hidden:
            return False
        if self.parent is not None and self.name == "help":
            return False
        return self.runnable or any(c.available for c in self.children)

    def command_path(self) -> str:
        if self.parent is None:
            return self.name or ROOT_NAME
        return f"{self.parent.command_path()} {self.name}"

    def find_child(self, name: str) -> CobraCommand | None:
        for child in self.commands.values():
            if child.name == name or name in child.spec.aliases:  # type: ignore[attr-defined]
                return child  # type: ignore[return-value]
        return None

    def declared_flags(self) -> list[Flag]:
        """The flags known before execution (Cobra adds ``--help`` only when executing)."""
        return list(self.spec.flags)

    def all_flags(self) -> list[Flag]:
        help_flag = Flag("help", BOOL, False, f"help for {self.name}", shorthand="h")
        return [*self.spec.flags, help_flag]

    # -- help ----------------------------------------------------------------------------------

    def help_text(self) -> str:
        text = (self.spec.long or self.spec.short).rstrip()
        out = text + "\n\n" if text else ""
        if self.runnable or self.commands:
            out += self.usage_text()
        return out

    def usage_text(self) -> str:
        out = "Usage:"
        visible = [c for c in self.children if c.available or c.name == "help"]
        has_available = any(c.available for c in self.children)
        if self.runnable:
            out += f"\n  {self.use_line()}"
        if has_available:
            out += f"\n  {self.command_path()} [command]"
        if self.spec.aliases:
            out += "\n\nAliases:\n  " + ", ".join([self.name or "", *self.spec.aliases])
        if has_available:
            pad = max([11, *(len(c.name or "") for c in self.children)])
            out += "\n\nAvailable Commands:"
            for child in visible:
                out += f"\n  {(child.name or '').ljust(pad)} {child.spec.short}"
        usages = FlagSet(self.all_flags()).usages().rstrip()
        if usages:
            out += "\n\nFlags:\n" + usages
        if has_available:
            out += (
                f'\n\nUse "{self.command_path()} [command] --help" '
                "for more information about a command."
            )
        return out + "\n"

    def use_line(self) -> str:
        if self.parent is None:
            line = self.spec.use
        else:
            line = f"{self.parent.command_path()} {self.spec.use}"
        if "[flags]" not in line:
            line += " [flags]"
        return line

    def root(self) -> CobraCommand:
        return self if self.parent is None else self.parent.root()


# ---------------------------------------------------------------------------------------------
# Positional argument validators (cobra.ExactArgs, cobra.NoArgs)


def exact_args(n: int) -> ArgsValidator:
    def validate(command: CobraCommand, args: list[str]) -> None:
        if len(args) != n:
            raise CLIError(f"accepts {n} arg(s), received {len(args)}")

    return validate


def no_args(command: CobraCommand, args: list[str]) -> None:
    if args:
        raise CLIError(
            f"unknown command {go_quote(args[0])} for {go_quote(command.command_path())}"
        )


def arbitrary_args(command: CobraCommand, args: list[str]) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Finding the command (Cobra's Find / stripFlags / argsMinusFirstX)


def _takes_value(flags: list[Flag], s: str) -> bool:
    """Cobra's look-ahead: a ``--name`` or ``-x`` without ``=`` eats the next argument unless
    it is a known bool flag (unknown flags are assumed to take a value)."""
    if "=" in s:
        return False
    if s.startswith("--"):
        return not any(f.name == s[2:] and f.takes_no_value for f in flags)
    if s.startswith("-") and len(s) == 2:
        return not any(f.shorthand == s[1] and f.takes_no_value for f in flags)
    return False


def strip_flags(args: list[str], command: CobraCommand) -> list[str]:
    flags = command.declared_flags()
    commands = []
    rest = list(args)
    while rest:
        s = rest.pop(0)
        if s == "--":
            break
        if _takes_value(flags, s):
            if len(rest) <= 1:
                break
            rest.pop(0)
            continue
        if s and not s.startswith("-"):
            commands.append(s)
    return commands


def args_minus_first(command: CobraCommand, args: list[str], x: str) -> list[str]:
    flags = command.declared_flags()
    pos = 0
    while pos < len(args):
        s = args[pos]
        if s == "--":
            break
        if _takes_value(flags, s):
            pos += 2
            continue
        if not s.startswith("-") and s == x:
            return args[:pos] + args[pos + 1 :]
        pos += 1
    return args


def find(root: CobraCommand, args: list[str]) -> tuple[CobraCommand, list[str]]:
    """Cobra's ``Find``; raises :class:`UnknownCommandError` for an unknown root subcommand."""
    command, rest = root, list(args)
    while True:
        words = strip_flags(rest, command)
        if not words:
            break
        child = command.find_child(words[0])
        if child is None:
            break
        rest = args_minus_first(command, rest, words[0])
        command = child
    if command.spec.args is None and command.commands and command.parent is None:
        words = strip_flags(rest, command)
        if words:
            raise UnknownCommandError(
                f"unknown command {go_quote(words[0])} for {go_quote(command.command_path())}"
                + _suggestions(command, words[0]),
                command.command_path(),
            )
    return command, rest


def _suggestions(command: CobraCommand, typed: str) -> str:
    found = []
    # Cobra walks its unsorted command slice here, i.e. the order commands were added.
    for child in command.commands.values():
        assert isinstance(child, CobraCommand)
        if not child.available:
            continue
        name = child.name or ""
        if _levenshtein(typed.lower(), name.lower()) <= 2 or name.lower().startswith(typed.lower()):
            found.append(name)
    if not found:
        return ""
    return "\n\nDid you mean this?\n" + "".join(f"\t{name}\n" for name in found)


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ---------------------------------------------------------------------------------------------
# Executing (Cobra's ExecuteC / execute)


def execute_root(root: CobraCommand, args: list[str]) -> int:
    command, rest = find(root, args)
    return execute(command, rest)


def execute(command: CobraCommand, args: list[str]) -> int:
    flags = FlagSet(command.all_flags())
    try:
        flags.parse(args)
    except FlagError as e:
        raise CLIError(str(e)) from None
    if flags["help"] or not command.runnable:
        click.echo(command.help_text(), nl=False)
        return 0
    spec = command.spec
    (spec.args or arbitrary_args)(command, flags.args)
    runtime = command.root().runtime
    assert runtime is not None
    invocation = Invocation(command, flags, flags.args, runtime)
    if spec.pre_run is not None:
        spec.pre_run(invocation)
    missing = [name for name in spec.required if not flags.is_changed(name)]
    if missing:
        raise CLIError('required flag(s) "' + '", "'.join(missing) + '" not set')
    _validate_groups(spec, flags)
    assert spec.run is not None
    return spec.run(invocation) or 0


def _validate_groups(spec: Spec, flags: FlagSet) -> None:
    for group in sorted(spec.required_together, key=" ".join):
        unset = sorted(name for name in group if not flags.is_changed(name))
        if unset and len(unset) != len(group):
            raise CLIError(
                f"if any flags in the group [{' '.join(group)}] are set they must all be set; "
                f"missing [{' '.join(unset)}]"
            )
    for group in sorted(spec.one_required, key=" ".join):
        if not any(flags.is_changed(name) for name in group):
            raise CLIError(
                f"at least one of the flags in the group [{' '.join(group)}] is required"
            )


# ---------------------------------------------------------------------------------------------
# The help command Cobra adds to every root with subcommands


def help_command() -> CobraCommand:
    def run(inv: Invocation) -> None:
        root = inv.command.root()
        try:
            target, _ = find(root, inv.args)
        except UnknownCommandError:
            topic = "[" + " ".join(_backquote(a) for a in inv.args) + "]"
            click.echo(f"Unknown help topic {topic}", err=True)
            click.echo(root.usage_text(), err=True, nl=False)
            return
        click.echo(target.help_text(), nl=False)

    spec = Spec(
        use="help [command]",
        short="Help about any command",
        long=(
            "Help provides help for any command in the application.\n"
            f"Simply type {ROOT_NAME} help [path to command] for full details."
        ),
        run=run,
    )
    return CobraCommand("help", spec)


def _backquote(s: str) -> str:
    if "`" in s or any(not c.isprintable() for c in s):
        return go_quote(s)
    return "`" + s + "`"
