"""The install and serve decisions as pure functions: a verified manifest, the board's identity
and state and a trusted ``now`` in; a decision out, or a :class:`SecurityRefusal` raised."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from device_agent import crypto
from device_agent.bundle.format import Manifest
from device_agent.errors import Expired, RollbackRefused, WrongDevice
from device_agent.wire import format_time


@dataclass(frozen=True)
class Identity:
    """The public half of the board's identity (its private keys never leave the key store)."""

    device_id: str
    box_public: bytes
    sign_public: bytes

    @property
    def box_fingerprint(self) -> str:
        return crypto.fingerprint(self.box_public)


def trusted_now(system_now: datetime, floor: datetime | None) -> datetime:
    """The board's notion of now never moves backwards: a Pi has no real-time clock."""
    return system_now if floor is None or system_now >= floor else floor


def check_target(m: Manifest, me: Identity) -> None:
    if not crypto.constant_time_equal(m.device_id, me.device_id):
        raise WrongDevice(
            f"bundle is for device {m.device_id!r}, this board is {me.device_id!r}; "
            "install the bundle packed for this device"
        )
    if not crypto.constant_time_equal(m.device_key, me.box_fingerprint):
        raise WrongDevice(
            "bundle was sealed to another key of this device id (re-provisioned board?); "
            "repack with the board's current enrolment"
        )


def check_serving_life(m: Manifest, now: datetime) -> None:
    """A model past its end of life never serves again."""
    if m.end_of_life is not None and now >= m.end_of_life:
        raise Expired(f"model {m.model_id} v{m.model_version} reached end of life at {format_time(m.end_of_life)}")


def check_install(m: Manifest, me: Identity, highest_version: int | None, now: datetime) -> None:
    """Every check a verified bundle must pass before it may replace the installed model."""
    check_target(m, me)
    if m.expires is not None and now >= m.expires:
        raise Expired(
            f"bundle expired at {format_time(m.expires)} (board time {format_time(now)}); "
            "ask the publisher for a fresh bundle"
        )
    check_serving_life(m, now)
    if highest_version is not None and m.model_version <= highest_version:
        raise RollbackRefused(
            f"model {m.model_id} version {m.model_version} is not newer than version "
            f"{highest_version} already accepted; publish a higher --model-version"
        )
