"""``python -m kamal_proxy.cli`` runs the ``kamal-proxy`` program."""

from kamal_proxy.cli.main import main

main()
