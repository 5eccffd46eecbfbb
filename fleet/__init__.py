"""EdgeWard's operator tools: fleet telemetry and signed commands (see docs/operations.md)."""
