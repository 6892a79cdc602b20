"""Errors a user can fix. The CLI prints them without a traceback and exits with ``code``."""


class UserError(Exception):
    """Bad input from the user: a spec, a path, an option. Exit code 2."""

    code = 2
