"""Command-line entry points: ``replnode``, ``replrouter`` and ``replctl``."""
