"""Server side of Project Haystack's authentication (docHaystack/Auth): the HELLO and SCRAM
(RFC 5802, SHA-256, no channel binding) exchanges on ``/about``, then a bearer token.

Pure: credentials come in as :class:`Credentials` (salt, iterations, StoredKey, ServerKey —
never the password), handshakes are values the caller keeps between requests. Messages are
base64url without padding, as the spec says; SCRAM messages are ASCII, and base64 of ASCII text
never uses the two characters where base64 and base64url differ, so clients that decode either
way read them alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

HASH = "SHA-256"
DEFAULT_ITERATIONS = 10_000
_ATTR = re.compile(r"([A-Za-z]+)=([^,\s]*)")


class AuthFailed(Exception):
    """The exchange cannot go on: wrong proof, unknown handshake, malformed message."""


@dataclass(frozen=True)
class Credentials:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def derive(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> Credentials:
    """What is stored for a password (RFC 5802: StoredKey = H(ClientKey), ServerKey)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return Credentials(salt, iterations, hashlib.sha256(client_key).digest(), hmac.new(salted, b"Server Key", "sha256").digest())


def check_password(creds: Credentials, password: str) -> bool:
    """For HTTP Basic on /metrics and /ingest and the dashboard's login form."""
    derived = derive(password, creds.salt, creds.iterations)
    return hmac.compare_digest(derived.stored_key, creds.stored_key)


def b64url(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def unb64(text: str) -> bytes:
    """base64url or base64, padded or not."""
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError as exc:
        raise AuthFailed("malformed base64") from exc


def parse_header(value: str) -> tuple[str, dict[str, str]]:
    """``SCHEME a=b, c=d`` -> ("SCHEME" upper-cased, {a: b, c: d})."""
    scheme, _, rest = value.strip().partition(" ")
    return scheme.upper(), {k: v for k, v in _ATTR.findall(rest)}


def fake_credentials(secret: bytes, username: str) -> Credentials:
    """Deterministic credentials for an unknown user, so HELLO does not tell who exists."""
    salt = hmac.new(secret, b"salt:" + username.encode(), "sha256").digest()[:16]
    return Credentials(salt, DEFAULT_ITERATIONS, secrets.token_bytes(32), secrets.token_bytes(32))


@dataclass(frozen=True)
class Hello:
    """After HELLO: the username whose SCRAM exchange the token names."""

    username: str


@dataclass(frozen=True)
class FirstDone:
    """After the client-first message: what the final message is checked against."""

    username: str
    client_first_bare: str
    server_first: str
    nonce: str


def decode_hello(attrs: dict[str, str]) -> str:
    if "username" not in attrs:
        raise AuthFailed("HELLO without username")
    try:
        return unb64(attrs["username"]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthFailed("username is not UTF-8") from exc


def _fields(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        key, eq, value = part.partition("=")
        if eq and len(key) == 1:
            out.setdefault(key, value)
    return out


def server_first(state: Hello, creds: Credentials, data: str) -> tuple[FirstDone, str]:
    """Check the client-first message; the state to keep and the server-first message (encoded)."""
    try:
        message = unb64(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthFailed("client-first message is not UTF-8") from exc
    if not message.startswith("n,"):
        raise AuthFailed("channel binding is not supported (gs2 header must be n,,)")
    gs2_end = message.find(",", 2)
    bare = message[gs2_end + 1 :]
    fields = _fields(bare)
    if "r" not in fields or not fields["r"]:
        raise AuthFailed("client-first message without nonce")
    nonce = fields["r"] + secrets.token_hex(12)
    first = f"r={nonce},s={base64.b64encode(creds.salt).decode('ascii')},i={creds.iterations}"
    return FirstDone(state.username, bare, first, nonce), b64url(first)


def server_final(state: FirstDone, creds: Credentials, data: str) -> str:
    """Verify the client's proof; the server-final message (encoded). Raises AuthFailed."""
    try:
        message = unb64(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthFailed("client-final message is not UTF-8") from exc
    without_proof, sep, proof_text = message.rpartition(",p=")
    fields = _fields(without_proof)
    if not sep or fields.get("r") != state.nonce:
        raise AuthFailed("client-final message does not continue this exchange")
    if unb64(fields.get("c", "")) != b"n,,":
        raise AuthFailed("channel binding is not supported")
    auth_message = f"{state.client_first_bare},{state.server_first},{without_proof}".encode()
    signature = hmac.new(creds.stored_key, auth_message, "sha256").digest()
    proof = unb64(proof_text)
    if len(proof) != len(signature):
        raise AuthFailed("wrong proof length")
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), creds.stored_key):
        raise AuthFailed("wrong password")
    server_signature = hmac.new(creds.server_key, auth_message, "sha256").digest()
    return b64url("v=" + base64.b64encode(server_signature).decode("ascii"))
