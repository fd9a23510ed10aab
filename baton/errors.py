"""Errors shared by every part of the CLI (a module of its own, so `python -m baton.cli` catches them too)."""


class CommandError(Exception):
    """An error the user can act on; printed as one line, never as a traceback."""
