"""Command-line entry points of tpi."""
