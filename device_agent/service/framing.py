"""The local API's one HTTP/1.1 framing rule, as pure functions over the bytes of a request head.

Every request is framed the same way, whatever its method, endpoint or token, so that the server
and any client always agree where one request ends and the next begins (RFC 9112, sections 2-6,
taken strictly):

- the request line is ``METHOD SP TARGET SP HTTP/1.1`` (or ``HTTP/1.0``) and every line of the head
  ends in CRLF; a bare LF or CR, a second space, a control character, obs-fold (a line starting with
  white space), white space before a colon or a name that is not a token is a 400;
- the body is exactly ``Content-Length`` bytes: plain ASCII digits, at most 18 of them, given once;
  no length means no body, except that a POST without one is a 411;
- ``Transfer-Encoding`` of any kind is refused (501): chunked bodies are not implemented, and a
  request that carries both framings is the classic desync;
- ``Content-Length``, ``Transfer-Encoding``, ``Authorization``, ``Content-Type``, ``Host`` and
  ``Expect`` may appear once each; ``Expect`` knows only ``100-continue`` (else 417);
- HTTP/1.0 and ``Connection: close`` close the connection after the answer.

Every refusal here is a :class:`Refusal` whose answer closes the connection. The adapter
(:mod:`device_agent.service.http`) reads the lines within the bounds of ``serve.http`` and the
body as :func:`body_length` says; what it must do with a body nobody reads is its own rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 5.6.2 token characters
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) (HTTP/1\.[01])\r\n")
HEADER_LINE_RE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r\n")
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")

# A second copy of any of these makes the request ambiguous (two lengths, two tokens, two types).
SINGLE_HEADERS = frozenset({"content-length", "transfer-encoding", "authorization", "content-type", "host", "expect"})


class Refusal(Exception):
    """A request the framing rule refuses: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Head:
    """A request line and its header fields (lower-case names), as parsed."""

    method: str
    target: str
    version: str
    fields: dict[str, str]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.fields.get(name, default)

    @property
    def close(self) -> bool:
        """Whether the connection closes after this request's answer."""
        if self.version != "HTTP/1.1":
            return True  # HTTP/1.0 closes, even when it asks for keep-alive
        tokens = {t.strip().lower() for t in self.fields.get("connection", "").split(",")}
        return "close" in tokens

    @property
    def expects_continue(self) -> bool:
        return self.version == "HTTP/1.1" and "expect" in self.fields


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """Method, target and version of a request line (CRLF included), or a 400."""
    m = REQUEST_LINE_RE.fullmatch(line)
    if m is None:
        raise Refusal(400, "bad request line: expected 'METHOD /path HTTP/1.1' ending in CRLF")
    method, target, version = (g.decode("ascii") for g in m.groups())
    return method, target, version


def parse_header_line(line: bytes) -> tuple[str, str]:
    """Lower-case name and value of one header line (CRLF included), or a 400."""
    if line[:1] in (b" ", b"\t"):
        raise Refusal(400, "obsolete line folding in the request head: send each header on one line")
    m = HEADER_LINE_RE.fullmatch(line)
    if m is None:
        raise Refusal(400, "bad request header line: expected 'Name: value' ending in CRLF, no control characters")
    return m.group(1).decode("ascii").lower(), m.group(2).decode("latin-1")


def add_field(fields: dict[str, str], name: str, value: str) -> None:
    """Add one header to ``fields``: a second copy of a single header is a 400; other repeats are
    joined with commas (RFC 9110 5.3)."""
    if name in fields:
        if name in SINGLE_HEADERS:
            raise Refusal(400, f"duplicate {name} header")
        fields[name] = f"{fields[name]}, {value}"
    else:
        fields[name] = value


def body_length(head: Head) -> int:
    """The number of body bytes that follow ``head`` on the wire, or the refusal of its framing."""
    if "transfer-encoding" in head.fields:
        raise Refusal(501, "Transfer-Encoding is not supported: send the body with a Content-Length")
    if head.expects_continue and head.fields["expect"].lower() != "100-continue":
        raise Refusal(417, "the only expectation supported is 100-continue")
    raw = head.fields.get("content-length")
    if raw is None:
        if head.method == "POST":
            raise Refusal(411, "a POST needs a Content-Length header")
        return 0
    if not CONTENT_LENGTH_RE.fullmatch(raw):
        raise Refusal(400, "Content-Length must be one plain decimal number of at most 18 digits")
    return int(raw)
