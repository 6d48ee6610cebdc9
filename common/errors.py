"""The one exception type the command line turns into a one-line message.

Every expected failure (bad config, wrong key, no server, tampered stream) raises
`BootlinkError` with a message that names the cause *and* the fix; anything else is a bug
and gets a traceback.
"""


class BootlinkError(Exception):
    """An expected failure with a user-facing, one-line explanation."""


class ConfigError(BootlinkError):
    """The configuration file is missing, malformed, or holds an invalid value."""


class KeyFileError(BootlinkError):
    """The shared key file is missing, unsafe, or malformed."""


class ProtocolError(BootlinkError):
    """A peer sent something malformed, forged, replayed, or truncated."""


class Interrupted(BootlinkError):
    """The connection failed or the transfer broke off: the same request may succeed
    later (a cable plugged back in, a node restarted). Never for bytes proven wrong."""
