"""`PlanCache`: a directory of plan files (`plans/<fingerprint>.plan`, the JSON of `fastplan.planfile`),
written atomically, with a per-key lock (flock) that the kernel releases the moment its holder dies."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from filelock import FileLock, Timeout

logger = logging.getLogger("fastplan.cache")
ENV_DIR = "FASTPLAN_CACHE_DIR"
_KEY = re.compile(r"[0-9a-f]{64}")


def default_directory() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "fastplan")


class PlanCache:
    """Plans keyed by `PlanInputs.key`. A corrupt entry is removed and reported as a miss; a deleted
    directory is recreated on the next write; a read-only directory is still read. `lock(key)` lets
    one process plan a key while others wait at most `lock_wait_s` (then plan themselves)."""

    def __init__(self, directory: Optional[os.PathLike] = None, lock_wait_s: float = 300.0) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.lock_wait_s = lock_wait_s
        self._warned: set = set()

    @classmethod
    def default(cls) -> "PlanCache":
        return cls()

    @property
    def plans(self) -> Path:
        return self.directory / "plans"

    def path(self, key: str) -> Path:
        return self.plans / f"{key}.plan"

    def _estimates_path(self, key: str) -> Path:
        """Per-shard estimates beside the entry: large (a data-parallel table has one per rank) and only
        needed by `FastPlanLoader` and exports, so a warm start never reads them."""
        return self.plans / f"{key}.estimates"

    def _read_estimates(self, key: str):
        try:
            return self._estimates_path(key).read_bytes()
        except OSError:
            return None

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message, *args)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # ---- entries -----------------------------------------------------------------------------
    def get(self, key: str):
        """The cached `PlanFile` for `key`, or None (missing, unreadable or corrupt: then removed)."""
        from fastplan.planfile import PlanFileError, decode_plan

        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once("read", "fastplan: cannot read plan cache entry %s (%s); planning without it", path, e)
            return None
        try:
            entry = decode_plan(data, str(path), lazy=True)
            if entry.key != key:
                raise PlanFileError(f"{path}: holds the plan for key {str(entry.key)[:12]}, not {key[:12]}")
            entry._estimates = lambda: self._read_estimates(key)
            return entry
        except PlanFileError as e:
            removed = self.delete(key)
            logger.warning("fastplan: corrupt plan cache entry (%s); %s, replanning", e, "removed" if removed else "could not remove it")
            return None

    def put(self, key: str, plan: Any, *, report: Any = None, inputs: Optional[Dict[str, Any]] = None,
            estimates: Any = None) -> bool:
        """Store a plan (and its estimates: objects or their JSON) under `key`; False (with one warning) when the directory cannot be written."""
        from fastplan.planfile import PlanFileError, encode_estimates, encode_plan, write_atomic

        try:
            data = encode_plan(plan, report=report, inputs=inputs, key=key)
            sidecar = estimates if estimates is None or isinstance(estimates, bytes) else encode_estimates(estimates)
        except (PlanFileError, TypeError) as e:
            logger.warning("fastplan: plan not cached: %s", e)
            return False
        try:
            self.plans.mkdir(parents=True, exist_ok=True)
            if sidecar is not None:  # first, so an entry is never seen without its estimates
                write_atomic(self._estimates_path(key), sidecar)
            write_atomic(self.path(key), data)
            return True
        except OSError as e:
            self._warn_once("write", "fastplan: plan cache %s is not writable (%s); plans are read from it but not saved", self.directory, e)
            return False

    def _remove(self, path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def delete(self, key: str) -> bool:
        self._remove(self._estimates_path(key))
        return self.path(key).exists() and self._remove(self.path(key))

    def keys(self) -> List[str]:
        try:
            return sorted(p.stem for p in self.plans.glob("*.plan") if _KEY.fullmatch(p.stem))
        except OSError:
            return []

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def clear(self) -> int:
        n = sum(self.delete(k) for k in self.keys())
        shutil.rmtree(self.directory / "locks", ignore_errors=True)
        return n

    def verify(self) -> List[Tuple[str, str]]:
        """Read every entry; corrupt ones are removed (as `get` does). Returns (key, problem) for each."""
        from fastplan.planfile import PlanFileError, decode_plan

        problems = []
        for key in self.keys():
            try:
                entry = decode_plan(self.path(key).read_bytes(), str(self.path(key)))
                if entry.key != key:
                    raise PlanFileError(f"holds the plan for key {str(entry.key)[:12]}")
                entry._estimates = lambda: self._read_estimates(key)
                entry.estimates  # validated too
            except (OSError, PlanFileError) as e:
                removed = self.delete(key)
                problems.append((key, f"{e} ({'removed' if removed else 'could not remove it'})"))
        return problems

    # ---- concurrent planners -----------------------------------------------------------------
    def _owner_path(self, key: str) -> Path:
        return self.directory / "locks" / f"{key}.owner"

    def _owner(self, key: str) -> str:
        try:
            o = json.loads(self._owner_path(key).read_text())
            return f"pid {o['pid']} on {o['host']} (for {time.time() - o['since']:.0f} s)"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    @contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Held while one process plans `key`. Yields False when planning goes ahead without the lock
        (read-only cache, no flock support, or `lock_wait_s` spent waiting for a live holder)."""
        lock_dir = self.directory / "locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            # flock, never the existence-based fallback: a dead holder must not block anyone.
            lock = FileLock(str(lock_dir / f"{key}.lock"), fallback_to_soft=False)
            acquired = self._acquire(lock, key)
        except OSError as e:
            self._warn_once("lock", "fastplan: cannot lock in %s (%s); planning without the cache lock", lock_dir, e)
            acquired = False
        if not acquired:
            yield False
            return
        try:
            try:
                self._owner_path(key).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            except OSError:
                pass
            yield True
        finally:
            try:
                self._owner_path(key).unlink(missing_ok=True)
            except OSError:
                pass
            lock.release()

    def _acquire(self, lock: FileLock, key: str) -> bool:
        start = time.monotonic()
        try:
            lock.acquire(timeout=min(1.0, self.lock_wait_s))
            return True
        except Timeout:
            pass
        owner = self._owner(key)
        logger.warning("fastplan: waiting up to %.0f s for plan %s, being computed by %s", self.lock_wait_s, key[:12], owner)
        try:
            lock.acquire(timeout=max(0.0, self.lock_wait_s - (time.monotonic() - start)))
            return True
        except Timeout:
            logger.warning("fastplan: gave up waiting %.0f s for plan %s (held by %s); planning it here",
                           self.lock_wait_s, key[:12], self._owner(key))
            return False

    # ---- shipping plans between machines -----------------------------------------------------
    def export_to(self, directory: os.PathLike) -> int:
        """Copy every valid entry to `directory/<key>.plan` (corrupt entries are removed, not shipped)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.verify()
        n = 0
        for key in self.keys():
            entry = self.get(key)
            if entry is not None:
                entry.dump(out / f"{key}.plan")  # one file: plan, report and estimates
                n += 1
        return n

    def import_from(self, directory: os.PathLike) -> Tuple[int, List[str]]:
        """Copy the valid plan files of `directory` that carry a cache key; returns (count, problems)."""
        from fastplan.planfile import PlanFileError, decode_plan

        n, problems = 0, []
        for path in sorted(Path(directory).glob("*.plan")):
            try:
                entry = decode_plan(path.read_bytes(), str(path))
            except (OSError, PlanFileError) as e:
                problems.append(f"{path.name}: skipped: {e}")
                continue
            if entry.key is None or not _KEY.fullmatch(entry.key):
                problems.append(f"{path.name}: skipped: it has no cache key (write it with 'fastplan plan --out')")
                continue
            n += self.put(entry.key, entry.plan, report=entry.report, inputs=entry._inputs, estimates=entry.estimates)
        return n, problems
