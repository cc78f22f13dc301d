"""Password hashing with argon2id, off the event loop, with failures that take the same time."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Passwords:
    """Hashes and checks passwords; the argon2 work runs in a thread so calls keep flowing."""

    def __init__(self, *, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 1) -> None:
        """Defaults follow RFC 9106's second recommended option (64 MiB); tests pass cheaper costs."""
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        # Checked against when the account does not exist, so that an unknown email costs the
        # same time as a wrong password and cannot be told apart by timing.
        self._decoy = self._hasher.hash("decoy password that matches nothing")

    async def hash(self, password: str) -> str:
        """The argon2id hash of ``password``."""
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; with no stored hash, does the same work and says no."""
        target = stored_hash or self._decoy
        try:
            ok = await asyncio.to_thread(self._hasher.verify, target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return bool(ok) and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether the hash was made with weaker parameters than the current ones."""
        return self._hasher.check_needs_rehash(stored_hash)
