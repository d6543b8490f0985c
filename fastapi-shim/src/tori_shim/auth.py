"""Bearer API keys, each mapped to an owner.

Keys come from ``TORI_SHIM_API_KEYS`` (``owner:key,owner2:key2``) and/or
``TORI_SHIM_API_KEYS_FILE`` (one ``owner:key`` a line, ``#`` comments).
Only the SHA-256 of each key is kept in memory, so a heap dump or a repr of
the settings shows no key; a presented key is hashed and compared with
every stored hash in constant time (``hmac.compare_digest``, no early exit),
so neither the comparison nor the position of a match leaks timing.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

#: Owner names end up in the jobs table and in logs: keep them plain.
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
#: Shorter keys are refused at start-up: a guessable key is no key.
MIN_KEY_LEN = 16
#: The owner of every job when authentication is off (``--no-auth``), and of
#: rows written before jobs had owners.
ANONYMOUS = "anonymous"


class AuthConfigError(ValueError):
    """The key configuration is unusable; the message never contains a key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """SHA-256 of each key -> its owner."""

    _entries: tuple[tuple[bytes, str], ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def owners(self) -> list[str]:
        return sorted({o for _, o in self._entries})

    def __repr__(self) -> str:  # never the hashes either
        return f"ApiKeys({len(self._entries)} keys, owners={self.owners})"

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], source: str = "keys") -> "ApiKeys":
        entries: dict[bytes, str] = {}
        for owner, key in pairs:
            if not OWNER_RE.match(owner):
                raise AuthConfigError(
                    f"{source}: bad owner name {owner!r} (letters, digits, . _ @ -; "
                    f"at most 64 characters)")
            if len(key) < MIN_KEY_LEN:
                raise AuthConfigError(
                    f"{source}: the key of owner {owner!r} is shorter than {MIN_KEY_LEN} "
                    f"characters")
            d = _digest(key)
            if d in entries and entries[d] != owner:
                # One key for two owners would make every job's owner a coin toss.
                raise AuthConfigError(f"{source}: owners {entries[d]!r} and {owner!r} share "
                                      f"a key")
            entries[d] = owner
        return cls(tuple(entries.items()))

    def owner_of(self, key: str) -> Optional[str]:
        d = _digest(key)
        found: Optional[str] = None
        for stored, owner in self._entries:  # no early exit: constant time in the match
            if hmac.compare_digest(stored, d):
                found = owner
        return found


def _split(item: str, source: str, where: str) -> tuple[str, str]:
    owner, sep, key = item.partition(":")
    if not sep:
        # Do not echo the item: it may be a bare key pasted without its owner.
        raise AuthConfigError(f"{source}: {where} is not owner:key")
    return owner.strip(), key.strip()


def parse_keys_env(value: str) -> list[tuple[str, str]]:
    return [_split(item, "TORI_SHIM_API_KEYS", f"entry {n}")
            for n, item in enumerate((i for i in value.split(",") if i.strip()), 1)]


def parse_keys_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise AuthConfigError(f"TORI_SHIM_API_KEYS_FILE: cannot read {path}: "
                              f"{e.strerror}") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pairs.append(_split(line, f"TORI_SHIM_API_KEYS_FILE {path}", f"line {n}"))
    return pairs


def keys_from_env(env: Mapping[str, str]) -> ApiKeys:
    pairs: list[tuple[str, str]] = []
    if env.get("TORI_SHIM_API_KEYS"):
        pairs += parse_keys_env(env["TORI_SHIM_API_KEYS"])
    if env.get("TORI_SHIM_API_KEYS_FILE"):
        pairs += parse_keys_file(Path(env["TORI_SHIM_API_KEYS_FILE"]))
    return ApiKeys.from_pairs(pairs, "API keys")


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
