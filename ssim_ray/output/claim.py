"""The output's claim: one run at a time writes an output folder.

A run claims its output after planning and before it looks at what is there (the resume check), and holds
the claim until its merge is published. The claim is `_claim.json`: run id, purpose, host, pid (and, on
Linux, the boot id and the process's start time), when the run started, its last heartbeat and its lease
(`output.claim_ttl_s`). It is created with an exclusive write (`claim_store`: a hard link on local disk, a
PUT with `If-None-Match: *` on S3), so of two runs that reach it together exactly one gets it; the other
is refused with `ClaimHeldError`, naming the holder.

While held, a heartbeat thread rewrites it every `ttl_s / 4`, conditionally on the version it wrote last;
a rewrite that finds another version means another run took the claim over, and `ensure_held` then raises
`ClaimLostError` (the job checks it before its merge). On exit the claim is deleted, again only if it is
still this run's version.

A claim is stale, and is taken over by the next run (which records why in `taken_over`), when its heartbeat
is older than the larger of its own lease and the claimant's, or when it was made on this host (same host
name and boot) by a process that no longer exists. The takeover is a conditional replace of the exact
version judged stale, so of two runs that find the same stale claim only one takes it. Heartbeat ages
compare clocks of two machines: keep `claim_ttl_s` well above their skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ssim_ray.output.claim_store import claim_store
from ssim_ray.output.layout import CLAIM_FILE, output_filesystem
from ssim_ray.output.provenance import utc_now
from ssim_ray.secrets import redact_text

CLAIM_FORMAT = "ssim_ray.claim/1"
_ATTEMPTS = 5  # create / judge / take over rounds before giving up on a claim that keeps changing


class ClaimHeldError(RuntimeError):
    """Another live run holds the output's claim."""


class ClaimLostError(RuntimeError):
    """This run's claim was taken over (or could not be renewed within its lease) while it ran."""


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the holder."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, started: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return started is None or _process_start(pid) in (None, started)


@dataclass(frozen=True)
class ClaimRecord:
    """A parsed `_claim.json`."""

    run_id: str
    purpose: str
    host: str
    pid: int
    boot_id: Optional[str]
    pid_started: Optional[int]
    started: str
    heartbeat_unix: float
    ttl_s: float

    @classmethod
    def parse(cls, data: bytes) -> Optional["ClaimRecord"]:
        """The record, or None when the bytes are not a claim of format CLAIM_FORMAT."""
        try:
            doc = json.loads(data)
            if doc.get("format") != CLAIM_FORMAT:
                return None
            return cls(str(doc["run_id"]), str(doc.get("purpose", "")), str(doc["host"]), int(doc["pid"]),
                       doc.get("boot_id"), doc.get("pid_started"), str(doc["started"]),
                       float(doc["heartbeat_unix"]), float(doc["ttl_s"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self, now: float) -> str:
        """Who holds it, for messages: run, purpose, host, pid, start, heartbeat age."""
        return (f"run {self.run_id} ({self.purpose}, host {self.host}, pid {self.pid}, started {self.started}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_unix):.0f} s ago)")

    def stale_because(self, now: float, ttl_s: float, here: Mapping[str, Any]) -> Optional[str]:
        """Why this claim may be taken over, or None while its holder counts as alive."""
        if self.host == here["host"] and self.boot_id == here["boot_id"] and not _alive(self.pid, self.pid_started):
            return f"its process (pid {self.pid} on this host) is gone"
        lease = max(ttl_s, self.ttl_s)
        age = now - self.heartbeat_unix
        if age > lease:
            return f"its last heartbeat is {age:.0f} s old, more than the {lease:g} s lease"
        return None


def _here() -> Dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_started": _process_start(pid)}


class OutputClaim:
    """The exclusive claim of one run on one output folder, renewed by a heartbeat while held.

    Use as a context manager (acquire on enter, release on exit), or call `acquire` and `release`.

    Args:
        output_url: the output folder (any fsspec URL).
        run_id: this run's id (`stamps.new_run_id`).
        ttl_s: the lease: a claim whose heartbeat is older is stale. Heartbeats come every ttl_s / 4.
        storage_options: fsspec options for `output_url`.
        purpose: what the run does there, for the refusal's message ("audit", "merge_only").

    Example:
        >>> with OutputClaim("memory://doc-claim", run_id="run-a", ttl_s=60) as claim:
        ...     try:
        ...         OutputClaim("memory://doc-claim", run_id="run-b", ttl_s=60).acquire()
        ...     except ClaimHeldError as error:
        ...         print(str(error)[:42])
        memory://doc-claim is being written by run
    """

    def __init__(self, output_url: str, *, run_id: str, ttl_s: float,
                 storage_options: Optional[Mapping[str, Any]] = None, purpose: str = "audit") -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self.output_url, self.run_id, self.ttl_s, self.purpose = output_url, run_id, float(ttl_s), purpose
        self.shown = redact_text(output_url)  # for messages
        fs, root = output_filesystem(output_url, storage_options)
        self.path = f"{root}/{CLAIM_FILE}"
        self.store = claim_store(fs, self.path)
        self.here = _here()
        self.started = utc_now()
        self.taken_over: Optional[str] = None
        self._token: Any = None
        self._lost: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _document(self) -> bytes:
        now = time.time()
        doc = {"format": CLAIM_FORMAT, "run_id": self.run_id, "purpose": self.purpose, **self.here,
               "started": self.started, "heartbeat": utc_now(), "heartbeat_unix": now, "ttl_s": self.ttl_s}
        return json.dumps(doc, indent=1).encode("utf-8")

    def acquire(self) -> "OutputClaim":
        """Create the claim, or take over a stale one; start the heartbeat.

        Returns:
            self.

        Raises:
            ClaimHeldError: a live run holds the claim (the message names it), or the claim kept changing.
        """
        for _ in range(_ATTEMPTS):
            token = self.store.create(self._document())
            if token is not None:
                return self._start(token)
            current = self.store.read()
            if current is None:
                continue  # released in between: try to create again
            data, version = current
            record, now = ClaimRecord.parse(data), time.time()
            if record is None:
                raise ClaimHeldError(
                    f"{self.shown} has a {CLAIM_FILE} that is not a claim of format {CLAIM_FORMAT}; if no "
                    f"run is writing there, delete it and start again")
            reason = record.stale_because(now, self.ttl_s, self.here)
            if reason is None:
                raise ClaimHeldError(self._held_message(record, now))
            token = self.store.replace(version, self._document())
            if token is not None:
                self.taken_over = f"took over the output's claim from {record.describe(now)}: {reason}"
                return self._start(token)
        raise ClaimHeldError(f"{self.shown}: its {CLAIM_FILE} changed {_ATTEMPTS} times while this run "
                             "tried to claim it; another run is starting there. Try again, or use another output.url")

    def _held_message(self, record: ClaimRecord, now: float) -> str:
        return (f"{self.shown} is being written by {record.describe(now)}; one run at a time may write an "
                "output. Wait for it to finish, or use another output.url. A claim is taken over once its "
                f"heartbeat is older than output.claim_ttl_s={self.ttl_s:g} s (or, on its own host, once its "
                f"process is gone); if that run died on another host, you may delete {CLAIM_FILE} there.")

    def _start(self, token: Any) -> "OutputClaim":
        self._token = token
        self._thread = threading.Thread(target=self._beat, name="ssim-claim-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    token = self.store.replace(self._token, self._document())
                except Exception as error:  # noqa: BLE001 - a store outage: retried until the lease runs out
                    if time.monotonic() - last_renewed > self.ttl_s:
                        self._lost = f"the claim could not be renewed for {self.ttl_s:g} s (last error: {error!r})"
                        return
                    continue
                if token is None:
                    self._lost = self._loss_reason()
                    return
                self._token, last_renewed = token, time.monotonic()

    def _loss_reason(self) -> str:
        current = self.store.read()
        record = ClaimRecord.parse(current[0]) if current else None
        holder = record.describe(time.time()) if record else "nobody (the claim file is gone)"
        return f"this run's claim on {self.shown} was taken over; it is now held by {holder}"

    def ensure_held(self) -> None:
        """Raise ClaimLostError when the claim was taken over or could not be renewed within its lease.

        Raises:
            ClaimLostError: naming the new holder, or the renewal error.
        """
        if self._token is None:
            raise ClaimLostError(f"{self.shown}: this run ({self.run_id}) holds no claim")
        if self._lost is not None:
            raise ClaimLostError(f"{self._lost}. Nothing is merged by this run; committed shards are kept.")

    def release(self) -> None:
        """Stop the heartbeat and delete the claim if it is still this run's version."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._token is not None and self._lost is None:
                self.store.delete(self._token)
            self._token = None

    def __enter__(self) -> "OutputClaim":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
