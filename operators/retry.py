"""Retrying transient storage errors with exponential backoff.

Object stores fail now and then: a connection reset, a 500 or 503 (SlowDown), a read timeout.
botocore and s3fs retry some of these themselves; this is the outer, bounded layer around
whole operations (a ranged read served to the decoder, the write of one output file), so a
blip longer than their retries costs a pause, not a segment or a job.

Not retried: what retrying cannot fix (a missing object, a refused permission, a bad
argument, credentials that are missing or that the store refuses: those raise
:class:`CredentialsError` at once, saying what to set). After the last attempt the error is
raised with the number of attempts in its message, and with a hint to check the endpoint
when it never answered (nothing listens there, or its name does not resolve); the caller
decides what a failure means (a read: the decoder records the segment's error; a write: the
segment is not marked complete).

Where someone waits at the console for a first answer (a job's planning, ``vidprune
report``), :func:`give_up_when_unreachable` stops after the first attempt that never reached
the endpoint: botocore has retried it already, and a wrong endpoint is far likelier there than
an outage (six attempts took over a minute to say so).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

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


#: botocore's errors for credentials it cannot find, and the S3 error codes of credentials
#: the store refuses (s3fs turns some into PermissionError, InvalidToken into an OSError).
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")
_REFUSED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                        "ExpiredToken", "InvalidSecurity")
#: Errors that mean no connection was made at all: the endpoint never answered.
_NO_CONNECTION = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                  "ConnectionRefusedError", "gaierror")

NO_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where "
                       "vidprune runs, or storage.anon: true in the spec for a public bucket")
REFUSED_CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and "
                            "AWS_SESSION_TOKEN), and that storage.endpoint_url and "
                            "storage.region in the spec name the store they belong to")
NO_CONNECTION_HINT = ("the endpoint never answered: check --endpoint-url / "
                      "storage.endpoint_url, and that the store is up")


class CredentialsError(PermissionError):
    """The store's credentials are missing or refused; the message says what to set."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def credentials_hint(exc: BaseException) -> str | None:
    """What to do when ``exc`` (or an error behind it) says the credentials are missing or
    refused; None otherwise."""
    for e in _chain(exc):
        if type(e).__name__ in _NO_CREDENTIALS:
            return NO_CREDENTIALS_HINT
        code = (getattr(e, "response", None) or {}).get("Error", {}).get("Code")
        if code in _REFUSED_CREDENTIALS:
            return REFUSED_CREDENTIALS_HINT
    return None


def never_connected(exc: BaseException) -> bool:
    """True when no connection to the endpoint was made (refused, unknown host, timeout
    while connecting), as opposed to one that failed once made."""
    return any(c.__name__ in _NO_CONNECTION for e in _chain(exc) for c in type(e).__mro__)


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of the message."""
    return f"{type(exc).__name__}: {' '.join((str(exc) or type(exc).__name__).split())[:300]}"


def is_transient(exc: BaseException) -> bool:
    """True for errors worth another attempt: OSErrors other than :data:`PERMANENT`
    (s3fs raises OSError for 5xx replies and lost connections), and the network errors of
    the HTTP libraries underneath; never missing or refused credentials."""
    if isinstance(exc, PERMANENT) or credentials_hint(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.startswith(_NETWORK_MODULES)


#: Attempts after which an endpoint that never answered is given up (None: all of them).
_UNREACHABLE_ATTEMPTS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "vidprune_unreachable_attempts", default=None)


@contextlib.contextmanager
def give_up_when_unreachable(attempts: int = 1) -> Iterator[None]:
    """Within this block (in this thread), :func:`retry` gives up on an endpoint that never
    answered after ``attempts`` attempts; other transient errors keep the full policy."""
    token = _UNREACHABLE_ATTEMPTS.set(attempts)
    try:
        yield
    finally:
        _UNREACHABLE_ATTEMPTS.reset(token)


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


class RetriesExhausted(OSError):
    """A transient error that outlasted every attempt (the last error is the cause)."""


def retry(fn: Callable[[], T], what: str, backoff: Backoff | None = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, again after a pause while it raises a transient error (see the module
    docstring). ``what`` names the operation in the final error."""
    backoff = backoff or default_backoff()
    unreachable_attempts = _UNREACHABLE_ATTEMPTS.get()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            hint = credentials_hint(exc)
            if hint:
                raise CredentialsError(f"{what} failed: {describe(exc)}; {hint}") from exc
            if not is_transient(exc):
                raise
            unreached = never_connected(exc)
            if attempt == backoff.attempts or (unreached and unreachable_attempts is not None
                                               and attempt >= unreachable_attempts):
                hint = f"; {NO_CONNECTION_HINT}" if unreached else ""
                raise RetriesExhausted(f"{what} failed {_times(attempt)}; last error: "
                                       f"{describe(exc)}{hint}") from exc
            sleep(backoff.delay_s(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
