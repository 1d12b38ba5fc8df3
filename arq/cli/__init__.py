"""The ``arq`` command line: one module per sub-command, dispatched by :mod:`arq.cli.main`.

Each sub-command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
"""
