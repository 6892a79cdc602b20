"""Retrying transient storage errors with exponential backoff.

Object stores fail now and then: a connection reset, a 500 or 503 (SlowDown), a read timeout.
botocore and s3fs retry some of these themselves; this is the outer, bounded layer around
whole operations (a ranged read served to the decoder, the write of one output file), so a
blip longer than their retries costs a pause, not a segment or a job.

Not retried: what retrying cannot fix (a missing object, a refused permission, a bad
argument). After the last attempt the error is raised with the number of attempts in its
message; the caller decides what a failure means (a read: the decoder records the
segment's error; a write: the segment is not marked complete).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

#: Errors no retry can fix.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
             FileExistsError)
#: Libraries whose own exception types (not OSError subclasses) signal network trouble.
_NETWORK_MODULES = ("botocore", "aiohttp", "urllib3", "http.client", "ssl")


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries in all; the k-th wait is ``base_s * 2**(k-1)`` (at most
    ``max_s``), scaled by a random factor in [0.5, 1] so that many workers hit by the same
    outage do not retry in lockstep. Defaults: 6 attempts over at most 15.5 s of waiting."""

    attempts: int = 6
    base_s: float = 0.5
    max_s: float = 8.0

    def delay_s(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def default_backoff() -> Backoff:
    """The default policy; ``VIDPRUNE_STORAGE_ATTEMPTS`` sets the number of attempts."""
    try:
        attempts = int(os.environ.get("VIDPRUNE_STORAGE_ATTEMPTS", "6"))
    except ValueError:
        attempts = 6
    return Backoff(attempts=max(1, attempts))


def is_transient(exc: BaseException) -> bool:
    """True for errors worth another attempt: OSErrors other than :data:`PERMANENT`
    (s3fs raises OSError for 5xx replies and lost connections), and the network errors of
    the HTTP libraries underneath."""
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.startswith(_NETWORK_MODULES)


class RetriesExhausted(OSError):
    """A transient error that outlasted every attempt (the last error is the cause)."""


def retry(fn: Callable[[], T], what: str, backoff: Backoff | None = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, again after a pause while it raises a transient error (see the module
    docstring). ``what`` names the operation in the final error."""
    backoff = backoff or default_backoff()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == backoff.attempts:
                text = " ".join((str(exc) or type(exc).__name__).split())[:300]
                raise RetriesExhausted(f"{what} failed {attempt} times; last error: "
                                       f"{type(exc).__name__}: {text}") from exc
            sleep(backoff.delay_s(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
