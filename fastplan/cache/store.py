"""`PlanCache`: plans on disk (diskcache) under their fingerprint, checksummed, safe across processes."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import diskcache

logger = logging.getLogger("fastplan.cache")
ENV_DIR = "FASTPLAN_CACHE_DIR"


def default_directory() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "fastplan")


class PlanCache:
    """A directory of plans keyed by `plan_fingerprint`. Entries are pickled (plan, report) with a
    sha256 checksum; a corrupt entry is logged, removed and reported as a miss. If the directory
    cannot be used, the cache warns once and behaves as empty."""

    def __init__(self, directory: Optional[os.PathLike] = None, lock_expire_s: float = 600.0) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.lock_expire_s = lock_expire_s
        self._cache: Optional[diskcache.Cache] = None
        self._disabled = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(self.directory))
            probe = f"__probe__{os.getpid()}"
            self._cache.set(probe, b"")  # fails early on a read-only directory
            self._cache.delete(probe)
        except Exception as e:  # noqa: BLE001 - any I/O problem means "plan without cache"
            self._disable(e)

    @classmethod
    def default(cls) -> "PlanCache":
        return cls()

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def _disable(self, error: Exception) -> None:
        if not self._disabled:
            logger.warning("fastplan: plan cache at %s is unusable (%s); planning without cache", self.directory, error)
        self._disabled = True

    # ---- entries -----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[Tuple[Any, Any]]:
        if self._disabled:
            return None
        try:
            entry = self._cache.get(key)
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            return None
        if entry is None:
            return None
        try:
            checksum, blob = entry
            if hashlib.sha256(blob).hexdigest() != checksum:
                raise ValueError("checksum mismatch")
            return pickle.loads(blob)
        except Exception as e:  # noqa: BLE001 - truncated or foreign data: recompute
            logger.warning("fastplan: cache entry %s is corrupt (%s); removed, replanning", key[:12], e)
            self.delete(key)
            return None

    def put(self, key: str, plan: Any, report: Any) -> None:
        if self._disabled:
            return
        blob = pickle.dumps((plan, report), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._cache.set(key, (hashlib.sha256(blob).hexdigest(), blob), tag=str(time.time()))
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def delete(self, key: str) -> bool:
        if self._disabled:
            return False
        try:
            return bool(self._cache.delete(key))
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            return False

    def keys(self) -> List[str]:
        if self._disabled:
            return []
        return sorted(k for k in self._cache.iterkeys() if isinstance(k, str) and len(k) == 64)

    def clear(self) -> int:
        return 0 if self._disabled else int(self._cache.clear())

    def __contains__(self, key: str) -> bool:
        return not self._disabled and key in self._cache

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held while one process plans `key`, so concurrent planners compute it once."""
        if self._disabled:
            yield
            return
        lock = diskcache.Lock(self._cache, f"lock:{key}", expire=self.lock_expire_s)
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            yield
            return
        try:
            yield
        finally:
            try:
                lock.release()
            except Exception:  # noqa: BLE001 - an expired lock is already gone
                pass

    # ---- shipping plans between machines -----------------------------------------------------
    def export_to(self, directory: os.PathLike) -> int:
        """Write every entry as `<key>.plan` (checksum line + pickle) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for key in self.keys():
            entry = self._cache.get(key)
            if entry is None:
                continue
            checksum, blob = entry
            (out / f"{key}.plan").write_bytes(checksum.encode() + b"\n" + blob)
            n += 1
        return n

    def import_from(self, directory: os.PathLike) -> int:
        """Load `<key>.plan` files written by `export_to`; files that fail their checksum are skipped."""
        n = 0
        for path in sorted(Path(directory).glob("*.plan")):
            data = path.read_bytes()
            checksum, _, blob = data.partition(b"\n")
            if hashlib.sha256(blob).hexdigest() != checksum.decode(errors="replace"):
                logger.warning("fastplan: %s fails its checksum; skipped", path.name)
                continue
            self._cache.set(path.stem, (checksum.decode(), blob))
            n += 1
        return n

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def destroy(self) -> None:
        """Close and delete the directory (tests and `fastplan cache clear --all`)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
