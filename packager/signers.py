"""Signers: every key the host signs with (publisher, operator, recovery), named by one string.

A signer is named the way ``--publisher-key``, ``--operator-key`` and ``--recovery-key`` take it:

- ``PATH`` or ``file:PATH``: a PEM key file made by ``edgeward keys`` (the host's one passphrase
  rule, :mod:`packager.keys`);
- ``pkcs11:token=...;object=...``: an Ed25519 key inside a PKCS#11 token (an HSM, a cloud KMS's
  PKCS#11 library, a YubiKey, SoftHSM), as an RFC 7512 URI. The key never leaves the token; the
  PIN comes from ``EDGEWARD_PKCS11_PIN`` or a ``pin-source=file:PATH`` (never from the command
  line), the module from ``module-path=`` or ``EDGEWARD_PKCS11_MODULE``.

Both give the same thing, a :class:`Signer`: the raw Ed25519 public key and ``sign(bytes)``. The
formats do not change: a bundle or command signed through PKCS#11 is the same Ed25519 signature
over the same bytes as one signed from a file. The fleet CA key is not a signer: it signs X.509
certificates and CRLs through ``cryptography``'s builders, which need the key in the process.

All PKCS#11 calls go through ``python-pkcs11`` (https://github.com/pyauth/python-pkcs11).
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent import crypto
from device_agent.errors import BadSignature, EdgeWardError, EnvironmentFault, FormatError, UsageError

PIN_ENV = "EDGEWARD_PKCS11_PIN"
MODULE_ENV = "EDGEWARD_PKCS11_MODULE"
MAX_PIN_BYTES = 256
ED25519_OID = "1.3.101.112"  # RFC 8410 id-Ed25519: the curve of an EC_EDWARDS key
# What a token must offer, by PKCS#11 3.0 name: to make an Ed25519 key, and to sign with it.
GENERATE_MECHANISM = "CKM_EC_EDWARDS_KEY_PAIR_GEN"
SIGN_MECHANISM = "CKM_EDDSA"
# RFC 7512 path attributes EdgeWard understands; anything else is refused, not ignored.
PATH_ATTRIBUTES = frozenset({"token", "manufacturer", "serial", "model", "object", "id", "type"})
QUERY_ATTRIBUTES = frozenset({"module-path", "pin-source"})


class Signer(ABC):
    """A private Ed25519 key the host signs with, wherever it lives. ``sign`` signs exactly the
    bytes given (the recipes in :mod:`device_agent.crypto` add the domain); ``public_raw`` is the
    32-byte public key boards trust. Close it (or use ``with``) when done."""

    uri: str  # how the key was named, without secrets: for reports and error messages
    public_raw: bytes

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""

    @property
    def fingerprint(self) -> str:
        return crypto.fingerprint(self.public_raw)

    def close(self) -> None:  # noqa: B027 - a file signer holds nothing to release
        """Release what the signer holds (a token session)."""

    def __enter__(self) -> Signer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FileSigner(Signer):
    """A key file made by ``edgeward keys`` (loaded under the passphrase rule) or a key in memory."""

    def __init__(self, key: Ed25519PrivateKey, uri: str = "memory:") -> None:
        self._key = key
        self.uri = uri
        self.public_raw = crypto.ed25519_public_raw(key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


# --- RFC 7512 URIs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI: which token, which key object, where the module and PIN are."""

    path: dict[str, str] = field(default_factory=dict)
    object_id: bytes | None = None
    module_path: str | None = None
    pin_source: str | None = None

    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def label(self) -> str | None:
        return self.path.get("object")

    def describe(self) -> str:
        """The URI's path part (token and object), which names the key and holds no secret; it
        parses back to the same key."""
        return "pkcs11:" + ";".join(f"{k}={v if k == 'id' else quote(v, safe='')}" for k, v in self.path.items())


def _pct(value: str, what: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: percent-encoding is not UTF-8") from e


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 ``pkcs11:`` URI, refusing what EdgeWard must not or cannot honour: a
    ``pin-value`` (a PIN on the command line ends up in shell history and CI logs), unknown or
    repeated attributes, and a URI that names neither a token nor an object."""
    if not uri.startswith("pkcs11:"):
        raise UsageError(f"{uri!r} is not a pkcs11: URI")
    path_part, _, query_part = uri[len("pkcs11:") :].partition("?")
    path: dict[str, str] = {}
    query: dict[str, str] = {}
    for part, sep, known, into in ((path_part, ";", PATH_ATTRIBUTES, path), (query_part, "&", QUERY_ATTRIBUTES, query)):
        for item in filter(None, part.split(sep)):
            name, eq, raw = item.partition("=")
            if not eq:
                raise UsageError(f"pkcs11 URI attribute {name!r} has no value (write NAME=VALUE)")
            if name == "pin-value":
                raise UsageError(
                    f"a PIN in the URI would land in shell history and CI logs: remove pin-value and set {PIN_ENV}, "
                    "or add pin-source=file:PATH"
                )
            if name not in known:
                raise UsageError(f"pkcs11 URI attribute {name!r} is not supported (use {', '.join(sorted(known))})")
            if name in into:
                raise UsageError(f"pkcs11 URI attribute {name!r} is given twice")
            into[name] = raw if name == "id" else _pct(raw, f"pkcs11 URI attribute {name}")
    if "type" in path and path["type"] != "private":
        raise UsageError("pkcs11 URI: type must be private (the signing key) or left out")
    object_id = unquote_to_bytes(path["id"]) if "id" in path else None
    if object_id == b"":
        raise UsageError("pkcs11 URI: id is empty (write percent-encoded bytes, e.g. id=%01%a2)")
    if not path.get("token") and not path.get("serial"):
        raise UsageError("pkcs11 URI names no token: add token=LABEL (softhsm2-util --show-slots lists them)")
    if not path.get("object") and object_id is None:
        raise UsageError("pkcs11 URI names no key: add object=LABEL (or id=%XX...)")
    return Pkcs11Uri(path, object_id, query.get("module-path"), query.get("pin-source"))


def _read_pin(source: str | None) -> str:
    """The user PIN: from ``pin-source=file:PATH`` (a file only its owner can read), else from
    ``EDGEWARD_PKCS11_PIN``; never from the command line."""
    if source is not None:
        path = Path(source.removeprefix("file:"))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise UsageError(f"pin-source {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"pin-source {path} is not a regular file")
            if st.st_mode & 0o077:
                raise UsageError(f"pin-source {path} is readable by other users (mode {oct(st.st_mode & 0o777)}); "
                                 "chmod 600 it")
            data = f.read(MAX_PIN_BYTES + 1)
        if len(data) > MAX_PIN_BYTES:
            raise UsageError(f"pin-source {path} is over {MAX_PIN_BYTES} bytes: it should hold only the PIN")
        try:
            pin = data.decode("utf-8", errors="strict").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise UsageError(f"pin-source {path} is not UTF-8 text") from e
        if not pin:
            raise UsageError(f"pin-source {path} is empty")
        return pin
    env_pin = os.environ.get(PIN_ENV)
    if not env_pin:
        raise UsageError(f"no PIN for the token: set {PIN_ENV}, or add pin-source=file:PATH to the pkcs11 URI")
    return env_pin


def _module(uri: Pkcs11Uri) -> str:
    module = uri.module_path or os.environ.get(MODULE_ENV) or ""
    if not module:
        raise UsageError(
            f"name the PKCS#11 module: add module-path=/path/to/module.so to the URI or set {MODULE_ENV} "
            "(SoftHSM on Debian: /usr/lib/softhsm/libsofthsm2.so)"
        )
    return module


# --- the token --------------------------------------------------------------------------------------


def missing_mechanisms(offered: Iterable[str], needed: Iterable[str]) -> list[str]:
    """The PKCS#11 mechanisms in ``needed`` that the token does not offer (by name)."""
    have = set(offered)
    return [m for m in needed if m not in have]


def require_mechanisms(offered: Iterable[str], needed: Iterable[str], token: str) -> None:
    """Refuse, naming them, when the token lacks a mechanism EdgeWard needs (Ed25519 is PKCS#11
    3.0's ``CKM_EDDSA``; older tokens and some KMS libraries only do RSA and ECDSA)."""
    missing = missing_mechanisms(offered, needed)
    if missing:
        raise EnvironmentFault(
            f"token {token!r} does not offer {', '.join(missing)} (PKCS#11 3.0 Ed25519), which EdgeWard's signatures "
            "need: use a token that supports Ed25519 (SoftHSM 2.6+, YubiHSM 2, a recent HSM firmware) or a key file"
        )


def _mechanism_name(m: Any) -> str:
    name = getattr(m, "name", None)
    return f"CKM_{name}" if name else f"CKM_0x{int(m):08x}"


class _Token:
    """One logged-in session on the token a URI names, through python-pkcs11."""

    def __init__(self, uri: Pkcs11Uri, *, rw: bool = False) -> None:
        import pkcs11
        from pkcs11 import exceptions as px

        self.uri = uri
        module = _module(uri)
        pin = _read_pin(uri.pin_source)
        try:
            lib = pkcs11.lib(module)
        except (RuntimeError, OSError) as e:
            raise EnvironmentFault(f"cannot load the PKCS#11 module {module}: {e or type(e).__name__}") from e
        try:
            self.token = self._pick(lib, uri, module)
            self.mechanisms = [_mechanism_name(m) for m in self.token.slot.get_mechanisms()]
        except px.PKCS11Error as e:
            raise EnvironmentFault(f"the PKCS#11 module {module} failed to list its tokens: {type(e).__name__}") from e
        self.label = self.token.label
        try:
            self.session = self.token.open(rw=rw, user_pin=pin)
        except (px.PinIncorrect, px.PinLenRange) as e:
            raise UsageError(f"token {self.label!r} refused the PIN: check {PIN_ENV} or the pin-source file") from e
        except px.PinLocked as e:
            raise UsageError(f"token {self.label!r} has locked its user PIN: its security officer must reset it") from e
        except px.PKCS11Error as e:
            raise EnvironmentFault(f"cannot open a session on token {self.label!r}: {type(e).__name__}") from e

    @staticmethod
    def _pick(lib: Any, uri: Pkcs11Uri, module: str) -> Any:
        """The one token the URI's token, serial, manufacturer and model attributes match."""
        criteria: dict[str, Any] = {}
        if uri.token:
            criteria["token_label"] = uri.token
        if "serial" in uri.path:
            criteria["token_serial"] = uri.path["serial"].encode()
        tokens = [
            t
            for t in lib.get_tokens(**criteria)
            if all(uri.path.get(k) in (None, getattr(t, a)) for k, a in (("manufacturer", "manufacturer_id"),
                                                                          ("model", "model")))
        ]
        if not tokens:
            present = ", ".join(sorted(repr(t.label) for t in lib.get_tokens() if t.label)) or "none"
            raise UsageError(f"no PKCS#11 token matches {uri.describe()} in {module} (tokens present: {present})")
        if len(tokens) > 1:
            raise UsageError(f"{len(tokens)} tokens match {uri.describe()}: add serial= to pick one")
        return tokens[0]

    def find(self, object_class: Any) -> Any:
        """The one object of ``object_class`` the URI names, or a refusal naming what is missing."""
        from pkcs11 import Attribute, KeyType
        from pkcs11 import exceptions as px

        attrs: dict[Any, Any] = {Attribute.CLASS: object_class}
        if self.uri.label:
            attrs[Attribute.LABEL] = self.uri.label
        if self.uri.object_id is not None:
            attrs[Attribute.ID] = self.uri.object_id
        try:
            found = list(self.session.get_objects(attrs))
        except px.PKCS11Error as e:
            raise EnvironmentFault(f"cannot search token {self.label!r}: {type(e).__name__}") from e
        what = f"{object_class.name.lower().replace('_', ' ')} {self.uri.describe()}"
        if not found:
            raise UsageError(f"token {self.label!r} holds no {what}: check object= and id=, or create it with "
                             "'edgeward keys KIND --pkcs11 URI'")
        if len(found) > 1:
            raise UsageError(f"token {self.label!r} holds {len(found)} objects matching {what}: add id= to pick one")
        key = found[0]
        if key[Attribute.KEY_TYPE] != KeyType.EC_EDWARDS:
            raise UsageError(f"{what} is a {key[Attribute.KEY_TYPE].name} key: EdgeWard signs with Ed25519 only")
        return key

    def close(self) -> None:
        self.session.close()


def ed25519_public_from_ec_point(ec_point: bytes) -> bytes:
    """The raw 32-byte key from a token's ``CKA_EC_POINT``: a DER OCTET STRING per PKCS#11 3.0
    (SoftHSM), or the raw bytes some tokens return."""
    from asn1crypto.core import OctetString

    if len(ec_point) == crypto.KEY_BYTES:
        return bytes(ec_point)
    try:
        raw = OctetString.load(bytes(ec_point)).native
    except ValueError as e:
        raise FormatError(f"the token's Ed25519 public key is not an OCTET STRING: {e}") from e
    if len(raw) != crypto.KEY_BYTES:
        raise FormatError(f"the token's Ed25519 public key is {len(raw)} bytes, not {crypto.KEY_BYTES}")
    return bytes(raw)


@dataclass(frozen=True)
class KeyProtection:
    """What the token says about a private key: a key that can leave the token is refused."""

    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool

    @property
    def stays_in_token(self) -> bool:
        return self.sensitive and not self.extractable


def _protection(key: Any) -> KeyProtection:
    from pkcs11 import Attribute

    return KeyProtection(
        bool(key[Attribute.SENSITIVE]),
        bool(key[Attribute.EXTRACTABLE]),
        bool(key[Attribute.ALWAYS_SENSITIVE]),
        bool(key[Attribute.NEVER_EXTRACTABLE]),
    )


class Pkcs11Signer(Signer):
    """An Ed25519 key inside a PKCS#11 token; signs with ``CKM_EDDSA`` in the token."""

    def __init__(self, uri: str) -> None:
        from pkcs11 import Attribute, ObjectClass

        parsed = parse_pkcs11_uri(uri)
        self.uri = parsed.describe()
        self._token = _Token(parsed)
        try:
            require_mechanisms(self._token.mechanisms, [SIGN_MECHANISM], self._token.label)
            self._key = self._token.find(ObjectClass.PRIVATE_KEY)
            self.protection = _protection(self._key)
            if not self.protection.stays_in_token:
                raise UsageError(
                    f"{self.uri} can leave the token (CKA_SENSITIVE={self.protection.sensitive}, "
                    f"CKA_EXTRACTABLE={self.protection.extractable}): make a new key with 'edgeward keys KIND --pkcs11'"
                )
            public = self._token.find(ObjectClass.PUBLIC_KEY)
            self.public_raw = ed25519_public_from_ec_point(public[Attribute.EC_POINT])
            # The public object must belong to the private key: a signature that boards trusting
            # public_raw would refuse is caught here, before anything is signed for real.
            probe = b"edgeward signer self-check"
            crypto.verify(self.public_raw, b"edgeward/signer-check", probe,
                          crypto.sign(self, b"edgeward/signer-check", probe))
        except BadSignature as e:
            self.close()
            raise UsageError(f"{self.uri}: the public key object does not match the private key") from e
        except BaseException:
            self.close()
            raise

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as px

        try:
            return bytes(self._key.sign(data, mechanism=Mechanism.EDDSA))
        except px.PKCS11Error as e:
            raise EnvironmentFault(f"token {self._token.label!r} failed to sign with {self.uri}: "
                                   f"{type(e).__name__}") from e

    def close(self) -> None:
        self._token.close()


@dataclass(frozen=True)
class GeneratedKey:
    uri: str
    public_raw: bytes
    protection: KeyProtection

    @property
    def fingerprint(self) -> str:
        return crypto.fingerprint(self.public_raw)


def generate_in_token(uri: str) -> GeneratedKey:
    """Make an Ed25519 key pair inside the token the URI names, labelled with its ``object``:
    the private half sensitive and not extractable (read back from the token and checked), the
    public half exported. An existing key of that label is never replaced."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    parsed = parse_pkcs11_uri(uri)
    if not parsed.label:
        raise UsageError("name the new key: add object=LABEL to the pkcs11 URI")
    token = _Token(parsed, rw=True)
    try:
        require_mechanisms(token.mechanisms, [GENERATE_MECHANISM, SIGN_MECHANISM], token.label)
        taken = list(token.session.get_objects({Attribute.LABEL: parsed.label}))
        if taken:
            raise UsageError(
                f"token {token.label!r} already holds {len(taken)} object(s) labelled {parsed.label!r}; refusing to "
                "add another key under that name (pick another object=, or delete the old one with the token's tool)"
            )
        key_id = parsed.object_id if parsed.object_id is not None else os.urandom(16)
        params = encode_named_curve_parameters(ED25519_OID)
        try:
            public, private = token.session.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                store=True,
                label=parsed.label,
                id=key_id,
                public_template={Attribute.EC_PARAMS: params, Attribute.VERIFY: True},
                private_template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.SIGN: True,
                },
            )
        except pkcs11.exceptions.PKCS11Error as e:
            raise EnvironmentFault(
                f"token {token.label!r} could not generate an Ed25519 key: {type(e).__name__}"
            ) from e
        protection = _protection(private)
        if not protection.stays_in_token:
            private.destroy()
            public.destroy()
            raise EnvironmentFault(f"token {token.label!r} made the key extractable despite the template; destroyed it")
        raw = ed25519_public_from_ec_point(public[Attribute.EC_POINT])
        path = dict(parsed.path)
        path["id"] = "".join(f"%{b:02x}" for b in key_id)
        return GeneratedKey(Pkcs11Uri(path).describe(), raw, protection)
    finally:
        token.close()


# --- naming a signer --------------------------------------------------------------------------------


def open_signer(spec: str, *, option: str = "--publisher-key") -> Signer:
    """The signer ``spec`` names: ``pkcs11:...``, ``file:PATH`` or a plain path (a key file)."""
    from .keys import load_private_key

    if not spec:
        raise UsageError(f"{option} is empty: give a key file, file:PATH or a pkcs11: URI")
    try:
        if spec.startswith("pkcs11:"):
            return Pkcs11Signer(spec)
        path = Path(spec.removeprefix("file:"))
        return FileSigner(load_private_key(path), f"file:{path}")
    except EdgeWardError as e:
        raise type(e)(f"{option}: {e}") from e
