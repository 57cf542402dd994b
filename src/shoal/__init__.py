"""shoal: run commands, daemons, browser terminals and small services across a fleet."""

__version__ = "0.1.0"
