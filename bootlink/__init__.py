"""bootlink: boot your laptop's own disk on another PC over a network cable."""

__version__ = "0.1.0"
