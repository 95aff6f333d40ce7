"""Hot reload when the bundle changes on disk, by polling (no inotify dependency).

The fingerprint is the bundle path's symlink target plus (name, inode, size, mtime) of every entry
in the directory: switching the ``bundle`` symlink, replacing the directory, or rewriting a file
in place all change it. A change is acted on only once the fingerprint has held still for one
poll interval, so a copy in progress is not validated half-written; a fingerprint that was tried
(and refused) is not tried again until something changes.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Hashable

log = logging.getLogger(__name__)


def fingerprint(path: str | Path) -> Hashable:
    real = os.path.realpath(path)
    try:
        with os.scandir(real) as it:
            entries = []
            for e in it:
                st = e.stat()
                entries.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError as e:
        return (real, "unreadable", e.errno)
    return (real, tuple(sorted(entries)))


class BundleWatcher:
    def __init__(self, path: Callable[[], Path], interval: float, on_change: Callable[[], object]):
        self._path = path
        self.interval = interval
        self._on_change = on_change
        self._base: Hashable = None
        self._pending: Hashable = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-watch", daemon=True)

    def rebase(self, fp: Hashable) -> None:
        """The bundle with this fingerprint was just tried (loaded or refused): do not try it again."""
        self._base = fp
        self._pending = None

    def start(self) -> "BundleWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def poll(self) -> bool:
        """One check; True if it called on_change."""
        fp = fingerprint(self._path())
        if fp == self._base:
            self._pending = None
            return False
        if fp != self._pending:  # changed since the last look: let it settle for one interval
            self._pending = fp
            return False
        self.rebase(fp)
        self._on_change()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive a bug in one reload
                log.exception("bundle watcher: reload failed")
