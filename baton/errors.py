"""Errors shared by every part of the CLI (a module of its own, so `python -m baton.cli` catches them too)."""


class CommandError(Exception):
    """An error the user can act on; printed as one line, never as a traceback."""


def check_own_port(flag: str, port: int, taken: dict[str, int | None]) -> int:
    """`port` of `flag` as a listener of its own: a port number, and none of `taken` ({other flag: its port}).
    CommandError naming the clash otherwise (the router's and the worker's --metrics-port)."""
    if not 0 < port <= 65535:
        raise CommandError(f"{flag} {port} is not a port number")
    for other, value in taken.items():
        if port == value:
            raise CommandError(f"{flag} {port} is {other} too: give it a port of its own")
    return port
