"""Errors a user can act on: the CLI prints their message alone, without a traceback."""


class UserError(Exception):
    """Bad input (config, path, URI, cluster request): the message names what and where."""
