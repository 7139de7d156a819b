"""One run per output location.

Local directory: an exclusive ``fcntl`` lock on ``OUTPUT/.lock`` (released by the kernel even if
the process is killed), as before. Object store (no locks there): an owner object
``OUTPUT/.owner.json`` = {token, host, pid, user, started, refreshed, lease_s}. A run that finds a
live owner fails with one line; an owner whose ``refreshed`` time is older than its lease, or
whose process is known dead on this host, is taken over with a warning. The holder refreshes the
owner object every round (:meth:`RunLock.refresh`) and, by default, from a heartbeat thread; a
refresh that finds another token raises (two runs that started in the same instant cannot both
keep going). Lease times compare clocks of different hosts: keep the lease well above their skew.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import IO, Any

from fedbip_ray.storage.errors import StorageError, cause
from fedbip_ray.storage.location import Location

LOCK = ".lock"
OWNER = ".owner.json"
LEASE_S = 120.0  # an owner not refreshed for this long is stale
SETTLE_S = 0.5  # wait before reading the owner object back (catches a simultaneous start)
_log = logging.getLogger(__name__)


class OwnershipLost(StorageError):
    """Another run owns the location now (this run must stop writing there)."""


@dataclass(frozen=True)
class Owner:
    """The content of ``.owner.json`` (times are Unix seconds)."""

    token: str
    host: str
    pid: int
    user: str
    started: float
    refreshed: float
    lease_s: float

    def stale(self, now: float) -> bool:
        return now - self.refreshed > self.lease_s

    def dead_here(self) -> bool:
        """Its process is on this host and no longer exists."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    def who(self, now: float) -> str:
        return (f"host {self.host}, pid {self.pid}, user {self.user}, "
                f"last seen {max(0.0, now - self.refreshed):.0f}s ago, lease {self.lease_s:.0f}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_owner(lease_s: float, now: float) -> Owner:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Owner(uuid.uuid4().hex, socket.gethostname(), os.getpid(), user, now, now, lease_s)


def parse_owner(data: bytes) -> Owner | None:
    """The owner recorded in ``data``, or None if it is not a valid owner record."""
    try:
        raw = json.loads(data)
        return Owner(str(raw["token"]), str(raw["host"]), int(raw["pid"]), str(raw["user"]),
                     float(raw["started"]), float(raw["refreshed"]), float(raw["lease_s"]))
    except (ValueError, TypeError, KeyError):
        return None


class RunLock:
    """Held for the life of a run; ``refresh()`` each round, ``release()`` (or ``with``) at the
    end."""

    def __init__(self, output: Location, owner: Owner | None = None, handle: IO[str] | None = None,
                 warn: Callable[[str], None] = _log.warning) -> None:
        self.output, self.owner, self._handle, self._warn = output, owner, handle, warn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: StorageError | None = None
        self._mutex = threading.Lock()

    @property
    def object(self) -> Location:
        return self.output / OWNER

    def refresh(self) -> None:
        """Renew the lease; :class:`OwnershipLost` if another run took this location over,
        ``StorageError`` if the store cannot be reached (after the client's retries)."""
        if self._error is not None:
            raise self._error
        if self.owner is None:
            return
        with self._mutex:
            now = time.time()
            current = read_owner(self.object)
            if current is None or current.token != self.owner.token:
                other = current.who(now) if current else "the owner object is gone"
                raise OwnershipLost(f"output {self.output.describe()}: another fedbip run took it "
                                    f"over ({other})")
            self.owner = replace(self.owner, refreshed=now)
            write_owner(self.object, self.owner)

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Refresh from a daemon thread every ``interval_s`` (default: a quarter of the lease)."""
        if self.owner is None or self._thread is not None:
            return
        interval = interval_s or self.owner.lease_s / 4
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                        name="fedbip-owner-heartbeat")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except OwnershipLost as exc:
                self._error = exc
                self._warn(str(exc))
                return
            except StorageError as exc:  # transient: the next beat (or round) tries again
                self._warn(f"{exc}; the lease will be renewed at the next heartbeat")

    def release(self) -> None:
        """Give the location up (the owner object is deleted only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.owner is not None:
            with self._mutex:
                current = read_owner(self.object)
                if current is not None and current.token == self.owner.token:
                    self.object.delete()
            self.owner = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_owner(obj: Location) -> Owner | None:
    try:
        return parse_owner(obj.read_bytes())
    except FileNotFoundError:
        return None


def write_owner(obj: Location, owner: Owner) -> None:
    obj.write_text(json.dumps(asdict(owner)))


def acquire(output: Location, *, lease_s: float = LEASE_S, heartbeat: bool = True,
            settle_s: float = SETTLE_S, warn: Callable[[str], None] = _log.warning) -> RunLock:
    """Take ``output`` for one run, or raise :class:`StorageError` (one line) if it is in use."""
    if output.is_local:
        return RunLock(output, handle=_flock(output), warn=warn)
    owner_obj = output / OWNER
    now = time.time()
    current = read_owner(owner_obj)
    if current is not None:
        if not (current.stale(now) or current.dead_here()):
            raise StorageError(f"output {output.describe()}: another fedbip run is using it "
                               f"({current.who(now)})")
        why = "its process is gone" if current.dead_here() else "its lease expired"
        warn(f"output {output.describe()}: taking over from a previous run "
             f"({why}; {current.who(now)})")
    elif owner_obj.exists():
        warn(f"output {output.describe()}: replacing an unreadable {OWNER}")
    mine = new_owner(lease_s, now)
    write_owner(owner_obj, mine)
    time.sleep(settle_s)
    back = read_owner(owner_obj)
    if back is None or back.token != mine.token:
        other = back.who(time.time()) if back else "the owner object vanished"
        raise StorageError(f"output {output.describe()}: another fedbip run started at the same "
                           f"time ({other})")
    lock = RunLock(output, owner=mine, warn=warn)
    if heartbeat:
        lock.start_heartbeat()
    return lock


def _flock(output: Location) -> IO[str]:
    out = output.local_path
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = (out / LOCK).open("w")
    except OSError as exc:
        raise StorageError(f"output directory {output.describe()}: {cause(exc)}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise StorageError(f"output {output.describe()}: another fedbip run is using this "
                           "directory") from None
    return fh


@contextmanager
def run_lock(output: Location, **kwargs: Any) -> Iterator[RunLock]:
    """``with run_lock(loc) as lock:`` = :func:`acquire` ... :meth:`RunLock.release`."""
    lock = acquire(output, **kwargs)
    try:
        yield lock
    finally:
        lock.release()
