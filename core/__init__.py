"""facegate."""
