"""Who may do what on a shared server: logins (rate-limited), admins, and upload quotas.

* :class:`Accounts`: ``USER:PASSWORD`` logins for Gradio's ``auth=`` (a callable), compared in constant
  time; after :attr:`Accounts.max_failures` wrong passwords for one user within :attr:`Accounts.window`
  seconds that user cannot log in (right password or not) until the window has passed, and all logins
  stop for a while when failures pile up across users. The admins (``--admin``) may change what everyone
  shares (fuse, unfuse, unload all, rescan, uploads); without admins everyone may.
* :class:`UploadQuota`: the bytes each session (or logged-in user) may upload.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict, deque
from typing import Callable


class Accounts:
    """Logins and admins; see the module docstring. ``clock`` is for tests."""

    max_failures = 5
    window = 60.0
    #: failures across all users within the window that stop every login until they age out
    max_total_failures = 50

    def __init__(self, logins: dict[str, str], admins=(), *, clock: Callable[[], float] = time.monotonic):
        if not logins:
            raise ValueError("accounts need at least one USER:PASSWORD login")
        unknown = sorted(set(admins) - set(logins))
        if unknown:
            raise ValueError(f"admin(s) {', '.join(unknown)} have no login (--auth USER:PASSWORD)")
        self._logins = dict(logins)
        self.admins = frozenset(admins)
        self._clock = clock
        self._failures: dict[str, deque] = defaultdict(deque)
        self._all_failures: deque = deque()
        self._lock = threading.Lock()

    def _recent(self, times: deque, now: float) -> int:
        while times and now - times[0] > self.window:
            times.popleft()
        return len(times)

    def locked(self, username: str) -> bool:
        """Whether logins for ``username`` are refused for now (too many recent failures)."""
        with self._lock:
            now = self._clock()
            return (self._recent(self._failures[username], now) >= self.max_failures
                    or self._recent(self._all_failures, now) >= self.max_total_failures)

    def __call__(self, username: str, password: str) -> bool:
        """Gradio's login check: the right password, and the user not locked out."""
        if self.locked(username):
            return False
        expected = self._logins.get(username)
        # compare_digest on both branches: an unknown user takes as long as a wrong password
        ok = hmac.compare_digest(str(password).encode(), (expected if expected is not None else "\0").encode())
        if ok and expected is not None:
            return True
        with self._lock:
            now = self._clock()
            self._failures[username].append(now)
            self._all_failures.append(now)
        return False

    def is_admin(self, username: str | None) -> bool:
        """Whether ``username`` may change what everyone shares (everyone may when there are no admins)."""
        return not self.admins or username in self.admins


class UploadQuota:
    """At most ``limit_bytes`` of accepted uploads per session (or per logged-in user)."""

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError("the upload quota cannot be negative")
        self.limit_bytes = limit_bytes
        self._used: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def check(self, who: str, size: int) -> None:
        """``ValueError`` when ``size`` more bytes would take ``who`` over the quota."""
        with self._lock:
            used = self._used[who]
        if used + size > self.limit_bytes:
            raise ValueError(f"this upload ({size / 2**20:.2f} MiB) would take your uploads to "
                             f"{(used + size) / 2**20:.2f} MiB; the quota per session is "
                             f"{self.limit_bytes / 2**20:.2f} MiB")

    def add(self, who: str, size: int) -> None:
        with self._lock:
            self._used[who] += size
