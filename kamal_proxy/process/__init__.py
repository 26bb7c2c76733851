"""The main process and its workers (DESIGN §1): spawning, the worker protocol, supervision.

``commands`` is the wire contract; ``worker`` is a worker's own program; ``supervisor`` is the
main process's side (spawn, replace, broadcast); ``certificates`` is a worker's view of ACME.
"""
