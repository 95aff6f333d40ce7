"""Bundles side by side, the active one behind a symlink: install, switch and roll back atomically.

    /etc/edgewatch/bundles/pump-vae-1.2.0/     one directory per name-version, never modified
    /etc/edgewatch/bundles/pump-vae-1.3.0/
    /etc/edgewatch/bundle          -> bundles/pump-vae-1.3.0    the one in service (config ``bundle``)
    /etc/edgewatch/bundle.previous -> bundles/pump-vae-1.2.0    where ``edge-agent rollback`` goes

A switch writes the new symlink under a temporary name and ``rename()``s it over the old one, so
the agent's watcher sees the old target or the new one, never a missing link. A bundle is
verified (hashes, schema, golden vectors) before it is copied in and again before it is switched
to. The agent verifies it a third time before serving it, and keeps the old one if that fails.
Same layout and naming as ``deploy/install.sh --bundle``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from agent.manifest import MANIFEST_FILE, BundleError, Manifest

Verify = Callable[[Path], Manifest]


def dir_name(m: Manifest) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{m.name}-{m.version}")


def verify_bundle(path: Path, backend: str, threads: int = 1) -> Manifest:
    """Everything the agent checks before serving a bundle: schema, sha256 of every file, golden vectors."""
    from agent.backends import open_backend
    from agent.manifest import load_manifest

    m = load_manifest(path)
    open_backend(backend, path, m, threads=threads)
    return m


class BundleStore:
    def __init__(self, link: str | Path):
        self.link = Path(link)
        self.previous_link = self.link.with_name(self.link.name + ".previous")
        self.root = self.link.parent / "bundles"

    def current(self) -> Path | None:
        """The directory the bundle symlink points to (None if ``bundle`` is not a symlink)."""
        return _target(self.link)

    def previous(self) -> Path | None:
        return _target(self.previous_link)

    def install(self, src: str | Path, verify: Verify, activate: bool = True) -> tuple[Path, Manifest, bool]:
        """Copy a verified bundle to ``bundles/<name>-<version>/`` and (by default) switch to it.

        Returns (installed directory, manifest, whether the active bundle changed).
        """
        if activate:
            self._check_link()  # before copying anything
        src = Path(src).resolve()
        m = verify(src)
        dest = self.root / dir_name(m)
        if src != dest.resolve():
            if dest.exists():
                if (dest / MANIFEST_FILE).read_bytes() != (src / MANIFEST_FILE).read_bytes():
                    raise BundleError(f"{dest} already holds a different {m.name} {m.version}; "
                                      f"give the new bundle its own version")
                verify(dest)  # same bundle again: reuse it if it is intact
            else:
                self._copy_in(src, dest)
        if not activate or self.current() == dest.resolve():
            return dest, m, False
        self.activate(dest)
        return dest, m, True

    def activate(self, target: Path) -> Path | None:
        """Point ``bundle`` at ``target`` and ``bundle.previous`` at the old target; returns the old one."""
        self._check_link()
        old = self.current()
        _swap_link(self.link, self._rel(target))
        if old is not None and old != Path(target).resolve():
            _swap_link(self.previous_link, self._rel(old))
        return old

    def rollback(self, verify: Verify) -> tuple[Path, Path | None]:
        """Switch back to ``bundle.previous`` (which then names the bundle rolled away from)."""
        self._check_link()
        prev = self.previous()
        if prev is None:
            raise BundleError(f"no previous bundle to roll back to ({self.previous_link} does not exist)")
        if not prev.is_dir():
            raise BundleError(f"previous bundle {prev} is gone ({self.previous_link} points to nothing)")
        verify(prev)
        cur = self.current()
        _swap_link(self.link, self._rel(prev))
        if cur is not None:
            _swap_link(self.previous_link, self._rel(cur))
        return prev, cur

    # ------------------------------------------------------------ helpers

    def _check_link(self) -> None:
        if self.link.exists() and not self.link.is_symlink():
            raise BundleError(f"{self.link} is a directory, not a symlink; move it to {self.root}/<name>-<version> "
                              f"and install it from there")

    def _rel(self, target: Path) -> str:
        # Relative links keep working when /etc/edgewatch is mounted or copied elsewhere (image builds).
        target = Path(target).resolve()
        base = self.link.parent.resolve()
        return os.path.relpath(target, base) if target.is_relative_to(base) else str(target)

    def _copy_in(self, src: Path, dest: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(src, tmp)
            for p in [tmp, *tmp.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            from agent.manifest import load_manifest

            load_manifest(tmp)  # the copy, not just the source, must match the hashes
            os.sync()  # on disk before the rename makes it visible: gateways lose power
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _target(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    return Path(os.path.realpath(link))


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # rename(2): atomic, and replaces the link itself, not the directory it points to
