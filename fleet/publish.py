"""Publishing the operator's retained messages: each board's command queue and the time beacon.

A retained message is the broker's one stored copy per topic: a board that subscribes (now or
after months offline) receives the latest at once. Every publish is QoS 1 and waits for the
broker's PUBACK, so a command reported as published is in the broker's hands.
"""

from __future__ import annotations

import secrets
import threading
import time
from types import TracebackType

from device_agent.errors import EnvironmentFault, SecurityRefusal
from device_agent.telemetry.mqtt import Broker, Link, Session

ACK_TIMEOUT_S = 30.0


class RetainedPublisher:
    """One short operator connection: connect (exit 4 if the broker is not reached), publish
    retained messages, wait for every acknowledgement, disconnect."""

    def __init__(self, broker: Broker, operator: str, connect_timeout: float = 10.0,
                 ack_timeout: float = ACK_TIMEOUT_S) -> None:
        self._acks: dict[int, bool] = {}
        self._cond = threading.Condition()
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.address = f"{broker.host}:{broker.port}"
        self._link = Link(broker, Session(f"{operator}-cmd-{secrets.token_hex(4)}"), on_ack=self._on_ack)

    def _on_ack(self, mid: int, ok: bool) -> None:
        with self._cond:
            self._acks[mid] = ok
            self._cond.notify_all()

    def __enter__(self) -> RetainedPublisher:
        self._link.start()
        try:
            self._link.require_connected(self.connect_timeout)
        except BaseException:
            self._link.stop()
            raise
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self._link.stop()

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish each (topic, payload) retained at QoS 1; return once the broker acknowledged
        them all. A PUBACK with an error code (the ACL refused the topic) is a SecurityRefusal;
        no PUBACK in time is an EnvironmentFault."""
        mids = [(t, self._link.publish(t, p, retain=True)) for t, p in messages]
        end = time.monotonic() + self.ack_timeout
        with self._cond:
            while not all(mid in self._acks for _, mid in mids):
                left = end - time.monotonic()
                if left <= 0:
                    missing = [t for t, mid in mids if mid not in self._acks]
                    raise EnvironmentFault(
                        f"the broker {self.address} did not acknowledge {len(missing)} message(s) within "
                        f"{self.ack_timeout:g} s (first: {missing[0]})"
                    )
                self._cond.wait(left)
            refused = [t for t, mid in mids if not self._acks[mid]]
        if refused:
            raise SecurityRefusal(
                f"the broker refused to take {', '.join(refused[:3])}: this operator certificate may not write there "
                "(re-run 'edgeward fleet broker-config' after enrolling the operator, and reload mosquitto)"
            )
