"""EdgeWard's host-side packager: harden, seal, sign and record models for edge boards."""

__version__ = "0.2.0"
