"""accessctl: durable, rate-limited access requests from the command line."""

__version__ = "0.8.0"
