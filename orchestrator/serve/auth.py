"""Who is calling: the Haystack handshake state (HELLO -> SCRAM -> bearer token), bearer tokens
and dashboard sessions (the same tokens, in a cookie), and HTTP Basic for machines that cannot do
SCRAM (Prometheus, gateways posting readings) on ``/metrics`` and ``/ingest`` only.

In memory, per process: a restarted server asks clients to log in again, which Haystack clients
do by themselves. Tokens are random (256 bits), expire after ``TOKEN_TTL_S`` of disuse, and are
never logged.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.serve import scram
from orchestrator.serve.users import User

log = logging.getLogger(__name__)

HANDSHAKE_TTL_S = 60.0
TOKEN_TTL_S = 8 * 3600.0
BASIC_CACHE_TTL_S = 300.0
RECHECK_S = 60.0  # a token's user is looked up again after this long: removed users lose access
Lookup = Callable[[str], tuple[User, scram.Credentials] | None]


@dataclass(frozen=True)
class Challenge:
    """An answer that continues the handshake: 401 with this WWW-Authenticate header."""

    www_authenticate: str


@dataclass(frozen=True)
class Granted:
    """The handshake is done: 200 with this Authentication-Info header."""

    authentication_info: str
    user: User


@dataclass(frozen=True)
class Denied:
    """403 (wrong password, unknown handshake) or 400 (malformed header)."""

    status: int
    reason: str


class Authenticator:
    def __init__(self, lookup: Lookup, clock: Callable[[], float] = time.monotonic) -> None:
        self.lookup = lookup
        self.clock = clock
        self.secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._handshakes: dict[str, tuple[float, scram.Hello | scram.FirstDone]] = {}
        self._tokens: dict[str, tuple[float, User]] = {}
        self._checked: dict[str, float] = {}  # token -> when its user was last found in the catalog
        self._basic: dict[tuple[str, bytes], tuple[float, User]] = {}

    # -- the Haystack handshake on /about

    def handshake(self, header: str) -> Challenge | Granted | Denied:
        scheme, attrs = scram.parse_header(header)
        try:
            if scheme == "HELLO":
                return self._hello(scram.decode_hello(attrs))
            if scheme == "SCRAM":
                return self._scram(attrs.get("handshakeToken", ""), attrs.get("data", ""))
        except scram.AuthFailed as exc:
            log.info("authentication refused: %s", exc)
            return Denied(403, str(exc))
        return Denied(400, f"unsupported authorization scheme {scheme!r}: use HELLO, SCRAM or BEARER")

    def _credentials(self, username: str) -> scram.Credentials:
        found = self.lookup(username)
        return found[1] if found else scram.fake_credentials(self.secret, username)

    def _hello(self, username: str) -> Challenge:
        token = secrets.token_hex(16)
        self._put_handshake(token, scram.Hello(username))
        return Challenge(f"SCRAM handshakeToken={token}, hash={scram.HASH}")

    def _scram(self, token: str, data: str) -> Challenge | Granted | Denied:
        with self._lock:
            entry = self._handshakes.pop(token, None)
        if entry is None or entry[0] < self.clock():
            return Denied(403, "unknown or expired handshake token: start again with HELLO")
        state = entry[1]
        if isinstance(state, scram.Hello):
            first, encoded = scram.server_first(state, self._credentials(state.username), data)
            self._put_handshake(token, first)
            return Challenge(f"SCRAM handshakeToken={token}, hash={scram.HASH}, data={encoded}")
        found = self.lookup(state.username)
        if found is None:
            log.info("authentication refused for unknown user %r", state.username)
            return Denied(403, "wrong user name or password")
        user, creds = found
        try:
            final = scram.server_final(state, creds, data)
        except scram.AuthFailed as exc:
            log.info("authentication refused for %s: %s", user.name, exc)
            return Denied(403, "wrong user name or password")
        bearer = self.issue(user)
        return Granted(f"authToken={bearer}, hash={scram.HASH}, data={final}", user)

    def _put_handshake(self, token: str, state: scram.Hello | scram.FirstDone) -> None:
        now = self.clock()
        with self._lock:
            self._handshakes = {k: v for k, v in self._handshakes.items() if v[0] >= now}
            self._handshakes[token] = (now + HANDSHAKE_TTL_S, state)

    # -- tokens (bearer and dashboard cookie)

    def issue(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (self.clock() + TOKEN_TTL_S, user)
            self._checked[token] = self.clock()
        log.info("user %s logged in (rights %s)", user.name, user.rights)
        return token

    def bearer(self, token: str) -> User | None:
        now = self.clock()
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None or entry[0] < now:
                self._tokens.pop(token, None)
                return None
            self._tokens[token] = (now + TOKEN_TTL_S, entry[1])
            stale = self._checked.get(token, 0.0) + RECHECK_S < now
        if stale:
            found = self.lookup(entry[1].name)
            if found is None:
                self.revoke(token)
                return None
            with self._lock:
                self._checked[token] = now
                self._tokens[token] = (now + TOKEN_TTL_S, found[0])  # rights may have changed
            return found[0]
        return entry[1]

    def revoke(self, token: str) -> None:
        with self._lock:
            entry = self._tokens.pop(token, None)
            self._checked.pop(token, None)
        if entry is not None:
            log.info("user %s logged out", entry[1].name)

    def password(self, username: str, password: str) -> User | None:
        """A user name and password checked against the stored verifier (login form, Basic);
        a success is remembered for a few minutes so a scraper does not pay PBKDF2 each time."""
        key = (username, hashlib.sha256(self.secret + password.encode()).digest())
        now = self.clock()
        with self._lock:
            cached = self._basic.get(key)
        if cached is not None and cached[0] >= now:
            return cached[1]
        found = self.lookup(username)
        if found is None or not scram.check_password(found[1], password):
            log.info("password refused for user %r", username)
            return None
        with self._lock:
            self._basic = {k: v for k, v in self._basic.items() if v[0] >= now}
            self._basic[key] = (now + BASIC_CACHE_TTL_S, found[0])
        return found[0]
