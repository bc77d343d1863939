"""A lock in the MLflow Model Registry itself, so that concurrent ``register`` runs
promote one at a time on any tracking store, a remote ``mlflow server`` included.

MLflow has no transactions, but creating a registered model whose name already exists
fails (a unique name in the database behind sqlite stores and servers). The lock on
``<name>`` is therefore the registered model ``<name>.lock``: created to take it, deleted
to release it. Whoever fails to create it waits and polls, up to ``timeout_s``.

Abandoned locks (a holder killed between create and delete): the lock carries an owner
token; a waiter that has seen the *same* token for ``stale_s`` seconds of its own clock
(no clock shared with the server is assumed) breaks it. Breaking is itself guarded by a
second lock, ``<name>.lock.break``, and re-checks the token inside it, so two waiters
never both break and then both take the lock. The critical section is meant to be short
(read the holder, compare, set an alias: a few requests), so ``stale_s`` can be short.

On the deprecated file store a registered model's creation is check-then-mkdir, not
atomic; the holder re-reads the owner tag after ``SETTLE_S`` to narrow that window.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException

log = logging.getLogger("pipeline.artifacts.registry_lock")

LOCK_SUFFIX = ".lock"
BREAK_SUFFIX = ".break"
OWNER_TAG = "lock_owner"
TIMEOUT_S = 300.0      # a register waits this long for another's short critical section
STALE_S = 60.0         # a lock held this long by one owner is taken as abandoned
POLL_S = 0.25
SETTLE_S = 0.05


class LockTimeout(RuntimeError):
    """The registry lock stayed held by another owner for the whole timeout."""


def lock_name(name: str) -> str:
    return name + LOCK_SUFFIX


def _owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _lost_race(exc: MlflowException) -> bool:
    """A create refused because the name is taken. The sqlite store answers a failed insert
    by reading the winner, which may have released the lock in between: "does not exist"
    then also means another holder was there, and the caller tries again."""
    return exc.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")


def _owner(client, lock: str) -> str | None:
    """The owner token of ``lock``, or None when nobody holds it."""
    try:
        return client.get_registered_model(lock).tags.get(OWNER_TAG, "")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _try_create(client, lock: str, token: str) -> bool:
    """Create ``lock`` owned by ``token``; False when someone else holds it."""
    try:
        client.create_registered_model(lock, tags={OWNER_TAG: token},
                                       description="registry lock of pipeline.register; delete it "
                                                   "only if no register stage is running")
    except MlflowException as exc:
        if _lost_race(exc):
            return False
        raise
    time.sleep(SETTLE_S)
    return _owner(client, lock) == token


def _delete_if_owner(client, lock: str, token: str) -> bool:
    if _owner(client, lock) != token:
        return False
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    return True


def _break_stale(client, lock: str, stale_token: str, stale_s: float) -> None:
    """Delete ``lock`` if it is still owned by ``stale_token``, holding the break lock."""
    breaker, token = lock + BREAK_SUFFIX, _owner_token()
    if not _try_create(client, breaker, token):
        # Another waiter is breaking it; a break lock older than stale_s is itself abandoned.
        holder = _owner(client, breaker)
        if holder is not None and _age_of(client, breaker) > stale_s:
            _delete_if_owner(client, breaker, holder)
        return
    try:
        if _delete_if_owner(client, lock, stale_token):
            log.warning("broke the registry lock %s held by %s for over %.0f s (taken as abandoned)",
                        lock, stale_token, stale_s)
    finally:
        _delete_if_owner(client, breaker, token)


def _age_of(client, lock: str) -> float:
    """Seconds since ``lock`` was created, by the store's clock against ours (break locks only)."""
    try:
        created = client.get_registered_model(lock).creation_timestamp or 0
    except MlflowException:
        return 0.0
    return time.time() - created / 1000.0


@contextmanager
def registry_lock(client, name: str, timeout_s: float = TIMEOUT_S, stale_s: float = STALE_S,
                  poll_s: float = POLL_S) -> Iterator[str]:
    """Hold the registry lock of registered model ``name`` for the ``with`` block.

    Yields the owner token. Raises ``LockTimeout`` naming the lock and its holder when it
    stays held by others for ``timeout_s`` seconds."""
    lock, token = lock_name(name), _owner_token()
    start = time.monotonic()
    seen: tuple[str, float] | None = None          # (holder's token, when we first saw it)
    while not _try_create(client, lock, token):
        now = time.monotonic()
        holder = _owner(client, lock)
        if holder is not None and holder != token:
            if seen is None or seen[0] != holder:
                seen = (holder, now)
            elif now - seen[1] >= stale_s:
                _break_stale(client, lock, holder, stale_s)
                seen = None
                continue
        if now - start >= timeout_s:
            raise LockTimeout(
                f"the registry lock {lock!r} in {client.tracking_uri} is held by {holder} for more "
                f"than {timeout_s:.0f} s; if no register stage is running, delete the registered "
                f"model {lock!r}")
        time.sleep(poll_s)
    try:
        yield token
    finally:
        if not _delete_if_owner(client, lock, token):
            log.warning("the registry lock %s was no longer ours on release (broken as stale?)", lock)
