"""One exception tree for EdgeWard; every error carries the exit code the contract gives it.

Callers catch :class:`EdgeWardError`; the CLIs turn it into one line on stderr and the code.
"""

from __future__ import annotations


class EdgeWardError(Exception):
    """Base of every error EdgeWard raises on purpose (exit 70 if not more specific)."""

    exit_code = 70


class SecurityRefusal(EdgeWardError):
    """Refused for security: bad signature, wrong device, rollback, expiry, revocation,
    throttling."""

    exit_code = 1


class BadSignature(SecurityRefusal):
    """A signature did not verify against the trusted key."""


class UnknownPublisher(SecurityRefusal):
    """The bundle names a publisher key that is not among the board's trust anchors."""


class WrongDevice(SecurityRefusal):
    """The bundle was sealed for another device or another device key."""


class RollbackRefused(SecurityRefusal):
    """A version or sequence number did not move forward."""


class Expired(SecurityRefusal):
    """The bundle's validity or the model's end of life has passed."""


class IntegrityError(SecurityRefusal):
    """Authenticated data failed its check (AEAD tag, digest): tampering or corruption."""


class TamperedState(SecurityRefusal):
    """The board's trusted state (installed records, floors, trust anchors, tokens) or a stored
    bundle does not match what the agent itself wrote: edited or replaced outside the agent."""


class UsageError(EdgeWardError):
    """The command was called wrongly (missing option, unknown profile, missing passphrase)."""

    exit_code = 2


class FormatError(EdgeWardError):
    """Malformed input: truncated, oversized, unknown version, bad encoding."""

    exit_code = 3


class InputMismatch(FormatError):
    """The input does not fit the model or its sealed pre-processing. The message describes the
    model (its shape, channels or crop); the agent replaces it with a generic one for callers
    who may not learn that (NCSC 3.3)."""


class EnvironmentFault(EdgeWardError):
    """The environment failed us: disk, permissions, broker unreachable."""

    exit_code = 4


class NotInstalled(EdgeWardError):
    """No model is installed where one is needed."""

    exit_code = 4


class AccuracyRefused(SecurityRefusal):
    """A hardened model lost more accuracy on the target runtime than the publisher allowed."""
