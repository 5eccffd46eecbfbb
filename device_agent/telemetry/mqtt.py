"""A small adapter over paho-mqtt: one MQTT 5 connection over TLS with a client certificate.

paho mixes protocol, sockets and threads in one class; the rest of EdgeWard sees only this
adapter: start, wait until connected, publish / subscribe at QoS 1, acknowledge, stop. paho's
own loop thread reconnects with exponential back-off; callbacks only hand facts to the caller
(never block, never take the caller's locks), so no lock is ever held across paho's.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.errors import EnvironmentFault, UsageError

QOS = 1


@dataclass(frozen=True)
class Broker:
    """Where the broker is and the TLS files this client proves itself with."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def parse(cls, address: str, ca: str, cert: str, key: str) -> Broker:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(
                f"broker address {address!r} must be HOST:PORT, e.g. broker.local:8883"
            )
        broker = cls(host.strip("[]"), int(port), Path(ca), Path(cert), Path(key))
        for what, p in (("--ca", broker.ca), ("--cert", broker.cert), ("--key", broker.key)):
            if not p.is_file():
                raise UsageError(f"{what} {p} does not exist; issue it with 'edgeward fleet enrol'")
        return broker


@dataclass(frozen=True)
class Session:
    """MQTT 5 session options for one client."""

    client_id: str
    clean_start: bool = True
    session_expiry: int = 0
    receive_maximum: int = 0  # 0: the broker's default
    max_inflight: int = 20
    keepalive: int = 30
    backoff: tuple[int, int] = (1, 30)  # seconds, paho doubles from min to max


class Link:
    """One MQTT 5 client connection; paho lives only in here."""

    def __init__(
        self,
        broker: Broker,
        session: Session,
        *,
        on_ack: Callable[[int, bool], None] | None = None,
        on_message: Callable[[str, bytes, int], None] | None = None,
        will: Callable[[], tuple[str, bytes]] | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.broker = broker
        self.session = session
        self._connected = threading.Event()
        self.last_error: str | None = None
        self._subscriptions: list[str] = []
        self._awaiting: set[int] = set()
        self._subacked: set[int] = set()  # SUBACKs seen (message ids), for flush_acks
        self._suback = threading.Event()
        self._manual_ack = manual_ack
        self._will = will
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=session.client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        try:
            c.tls_set(
                ca_certs=str(broker.ca),
                certfile=str(broker.cert),
                keyfile=str(broker.key),
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as e:
            raise UsageError(
                f"cannot load the TLS files ({broker.cert}, {broker.key}, {broker.ca}): {e}"
            ) from e
        c.max_inflight_messages_set(session.max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(*session.backoff)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        if on_ack is not None:
            c.on_publish = lambda _c, _u, mid, rc, _p: on_ack(mid, not rc.is_failure)
        if on_message is not None:
            c.on_message = lambda _c, _u, m: on_message(m.topic, bytes(m.payload), m.mid)
        self._client = c
        self._set_will()

    def _set_will(self) -> None:
        if self._will is not None:
            name, payload = self._will()
            self._client.will_set(name, payload, qos=QOS, retain=False)

    def _on_connect(self, client: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if rc.is_failure:
            self.last_error = f"broker refused the connection: {rc}"
            return
        self.last_error = None
        if not self._subscriptions:
            self._connected.set()
            return
        # Ready only once the broker has granted every subscription (see _on_subscribe).
        self._awaiting = {client.subscribe(f, qos=QOS)[1] for f in self._subscriptions}

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        self._subacked.add(mid)
        self._suback.set()
        if any(rc.is_failure for rc in codes):
            self.last_error = f"subscription refused by the broker: {codes}"
            return
        self._awaiting.discard(mid)
        if not self._awaiting:
            self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self._connected.clear()
        if rc.is_failure:
            self.last_error = f"disconnected: {rc}"
        # A fresh will (new sequence number) for the next connection attempt.
        self._set_will()

    def start(self) -> None:
        """Connect in the background; paho retries with back-off until :meth:`stop`."""
        props = Properties(PacketTypes.CONNECT)
        if self.session.session_expiry:
            props.SessionExpiryInterval = self.session.session_expiry
        if self.session.receive_maximum:
            props.ReceiveMaximum = self.session.receive_maximum
        try:
            self._client.connect_async(
                self.broker.host,
                self.broker.port,
                keepalive=self.session.keepalive,
                clean_start=self.session.clean_start,
                properties=props,
            )
        except (OSError, ValueError) as e:
            raise EnvironmentFault(
                f"cannot reach the broker {self.broker.host}:{self.broker.port}: {e}"
            ) from e
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and every subscription is granted."""
        return self._connected.wait(timeout)

    def require_connected(self, timeout: float) -> None:
        """Raise :class:`EnvironmentFault` unless connected within ``timeout`` seconds."""
        if not self.wait_connected(timeout):
            why = self.last_error or "no answer"
            raise EnvironmentFault(
                f"broker {self.broker.host}:{self.broker.port} unreachable ({why}); "
                "check the address, that the broker runs, and the client certificate"
            )

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe on every (re)connection, QoS 1; call before :meth:`start`."""
        self._subscriptions.append(topic_filter)

    def publish(self, topic_name: str, payload: bytes, retain: bool = False) -> int:
        """Hand one QoS 1 message to paho; returns its message id (acknowledged via on_ack).
        ``retain``: the broker keeps it for every later subscriber (a board's command queue)."""
        info = self._client.publish(topic_name, payload, qos=QOS, retain=retain)
        return int(info.mid)

    def ack(self, mid: int) -> None:
        self._client.ack(mid, QOS)

    def flush_acks(self, timeout: float) -> bool:
        """Wait until the broker has read every acknowledgement sent so far; True if it has.

        MQTT has no answer to a PUBACK, but a broker handles a client's packets in order: the
        SUBACK to a repeated subscription (the same filter again: the session is unchanged)
        proves it has read every PUBACK before it. Without this, disconnecting while messages
        are still arriving resets the connection (unread data at close means a TCP RST), and the
        broker may lose the acknowledgements it had not read yet and deliver them again."""
        # Connected, not necessarily :attr:`connected`: a resumed session's queued messages can
        # arrive before the broker has answered the subscriptions.
        if not (self._manual_ack and self._subscriptions and self._client.is_connected()):
            return True
        _, mid = self._client.subscribe(self._subscriptions[0], qos=QOS)
        end = time.monotonic() + timeout
        while mid not in self._subacked:
            if time.monotonic() >= end:
                return False
            self._suback.wait(0.05)
            self._suback.clear()
        return True

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop paho's thread; a client acknowledging by
        hand first waits (briefly) until the broker has read its acknowledgements."""
        self.flush_acks(5)
        self._client.disconnect()
        self._client.loop_stop()
