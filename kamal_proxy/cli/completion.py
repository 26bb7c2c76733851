"""The hidden ``completion`` command Cobra adds to every program with subcommands.

The scripts are small static ones (command names and flags), not Cobra's dynamic
``__complete`` protocol; the command exists so that ``kamal-proxy completion bash`` works.
"""

from __future__ import annotations

import click

from kamal_proxy.cli.command import ROOT_NAME, CobraCommand, Invocation, Spec, no_args
from kamal_proxy.cli.flags import BOOL, Flag

SHELLS = ("bash", "fish", "powershell", "zsh")


def _words(root: CobraCommand) -> tuple[list[str], dict[str, list[str]]]:
    names = [c.name or "" for c in root.children if c.available or c.name == "help"]
    flags: dict[str, list[str]] = {}
    for child in root.children:
        opts = ["--" + f.name for f in child.all_flags()]
        for grandchild in child.children:
            opts.append(grandchild.name or "")
        flags[child.name or ""] = opts
    return names, flags


def _script(shell: str, root: CobraCommand) -> str:
    names, flags = _words(root)
    if shell == "bash":
        cases = "".join(
            f'        {name}) words="{" ".join(opts)}" ;;\n' for name, opts in flags.items()
        )
        return (
            f"# bash completion for {ROOT_NAME}\n"
            "_kamal_proxy() {\n"
            '    local cur="${COMP_WORDS[COMP_CWORD]}" words\n'
            '    if [ "$COMP_CWORD" -eq 1 ]; then\n'
            f'        words="{" ".join(names)}"\n'
            "    else\n"
            '        case "${COMP_WORDS[1]}" in\n'
            f"{cases}"
            '        *) words="" ;;\n'
            "        esac\n"
            "    fi\n"
            '    COMPREPLY=($(compgen -W "$words" -- "$cur"))\n'
            "}\n"
            f"complete -F _kamal_proxy {ROOT_NAME}\n"
        )
    if shell == "zsh":
        return (
            f"#compdef {ROOT_NAME}\n"
            "_kamal_proxy() {\n"
            "  if (( CURRENT == 2 )); then\n"
            f"    compadd {' '.join(names)}\n"
            "  else\n"
            "    case $words[2] in\n"
            + "".join(
                f"      {name}) compadd -- {' '.join(opts)} ;;\n" for name, opts in flags.items()
            )
            + "    esac\n"
            "  fi\n"
            "}\n"
            f"compdef _kamal_proxy {ROOT_NAME}\n"
        )
    if shell == "fish":
        lines = [f"# fish completion for {ROOT_NAME}"]
        for name in names:
            lines.append(f"complete -c {ROOT_NAME} -n __fish_use_subcommand -f -a {name}")
        for name, opts in flags.items():
            for opt in opts:
                if opt.startswith("--"):
                    lines.append(
                        f"complete -c {ROOT_NAME} -n '__fish_seen_subcommand_from {name}' "
                        f"-l {opt[2:]}"
                    )
        return "\n".join(lines) + "\n"
    quoted = ", ".join(f"'{n}'" for n in names)
    return (
        f"# powershell completion for {ROOT_NAME}\n"
        f"Register-ArgumentCompleter -Native -CommandName '{ROOT_NAME}' -ScriptBlock {{\n"
        "    param($wordToComplete, $commandAst, $cursorPosition)\n"
        f'    @({quoted}) | Where-Object {{ $_ -like "$wordToComplete*" }}\n'
        "}\n"
    )


def completion_command() -> CobraCommand:
    def shell_command(shell: str) -> CobraCommand:
        def run(inv: Invocation) -> None:
            click.echo(_script(shell, inv.command.root()), nl=False)

        return CobraCommand(
            shell,
            Spec(
                use=shell,
                short=f"Generate the autocompletion script for {shell}",
                long=f"Generate the autocompletion script for {ROOT_NAME} for the {shell} shell.",
                flags=[Flag("no-descriptions", BOOL, False, "disable completion descriptions")],
                args=no_args,
                run=run,
            ),
        )

    return CobraCommand(
        "completion",
        Spec(
            use="completion",
            short="Generate the autocompletion script for the specified shell",
            long=(
                f"Generate the autocompletion script for {ROOT_NAME} for the specified shell.\n"
                "See each sub-command's help for details on how to use the generated script.\n"
            ),
            args=no_args,
            hidden=True,
        ),
        children=[shell_command(shell) for shell in SHELLS],
    )
