"""Outputs nobody else can redirect: new directories and files, created without following links.

`vtrace record` runs as root on production hosts, often in directories other users can
reach. Every output vtrace writes goes through this module:

- A trace directory is made by vtrace itself (mode 0750; one that already exists is refused,
  even empty) and every file in it is opened relative to the directory's descriptor with
  ``O_NOFOLLOW``, new files with ``O_EXCL``: a link planted under the directory's name or
  under a temporary file's name is never followed.
- A single file (``calibrate -o``, ``sweep -o``) is written under a fresh temporary name
  (``O_EXCL | O_NOFOLLOW``) next to it and renamed into place; an existing file is replaced
  only with ``force``, anything but a regular file never.
- An output whose parent directory other users can write is refused, unless the directory
  is sticky and owned by root (like /tmp): there nobody else can rename or replace what
  vtrace made.

:func:`check_new_dir` and :func:`check_new_file` check an output before the work that fills
it starts (a trial create, removed again), so a bad ``-o`` costs nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vtrace.errors import VtraceError

DIR_MODE = 0o750
FILE_MODE = 0o640  # trace files: guest addresses and process ids of the host
SINGLE_FILE_MODE = 0o644  # model configs and sweep results: nothing about the host

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that mean "this filesystem cannot take more", not a bug.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputError(VtraceError):
    """An output that cannot be made or written; ``errno`` is the system's code, if any."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def disk_full(self) -> bool:
        return self.errno in SPACE_ERRNOS


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _check_parent(fd: int, where: Path, what: Path) -> None:
    """Refuse a parent directory other users can write, unless sticky and owned by root."""
    st = os.fstat(fd)
    if st.st_mode & stat.S_IWOTH and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        raise OutputError(
            f"{what}: refusing to write in {where}: other users can write there (and it is not "
            "a sticky directory owned by root, like /tmp); choose a directory only you can write"
        )


def _existing_ancestor(path: Path, *, create: bool) -> tuple[int, Path, list[str]]:
    """A descriptor of the nearest existing directory above ``path``, checked, with the
    names of the missing ones below it (deepest first); without ``create`` none may miss."""
    at = Path(os.path.abspath(path)).parent
    missing: list[str] = []
    while True:
        try:
            # Links in the path above the output are followed (/var/run -> /run): the
            # directory reached is what is checked, and everything below is opened from it.
            fd = os.open(at, _DIR_FLAGS)
            break
        except FileNotFoundError:
            if not create or at == at.parent:
                raise OutputError(f"{path}: directory {at} does not exist") from None
            missing.append(at.name)
            at = at.parent
        except NotADirectoryError:
            raise OutputError(f"{path}: {at} is not a directory") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot open directory {at}: {_why(e)}", e.errno) from None
    try:
        _check_parent(fd, at, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, at, missing


def _open_parent(path: Path, *, create: bool) -> int:
    """A descriptor of ``path``'s parent directory, checked; with ``create``, missing
    ancestors are made (mode 0750) one by one relative to the last existing one."""
    fd, at, missing = _existing_ancestor(path, create=create)
    try:
        for name in reversed(missing):
            made = True
            try:
                os.mkdir(name, DIR_MODE, dir_fd=fd)
            except FileExistsError:
                made = False  # made meanwhile: opened without following links, checked below
            new = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = new
            if made:
                os.fchmod(fd, DIR_MODE)  # whatever the umask
            at = at / name
            _check_parent(fd, at, path)
    except OSError as e:
        os.close(fd)
        raise OutputError(f"{path}: cannot make directory {at}: {_why(e)}", e.errno) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _name(path: Path) -> str:
    name = Path(os.path.abspath(path)).name
    if not name or name in (".", ".."):
        raise OutputError(f"{path}: not a name for a new output")
    return name


class OutputDir:
    """A new directory this process made, and the files it creates inside it.

    Every operation is relative to the directory's descriptor, so renaming or replacing the
    path afterwards cannot redirect a write. ``remove`` deletes only what is inside it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = _name(self.path)
        parent = _open_parent(self.path, create=True)
        try:
            try:
                os.mkdir(self.name, DIR_MODE, dir_fd=parent)
            except FileExistsError:
                raise OutputError(
                    f"{self.path}: output exists; choose a new directory", errno.EEXIST
                ) from None
            except OSError as e:
                raise OutputError(f"{self.path}: cannot make it: {_why(e)}", e.errno) from None
            fd = os.open(self.name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
            # The mode whatever the umask: traces carry guest addresses and process ids.
            os.fchmod(fd, DIR_MODE)
        except BaseException:
            os.close(parent)
            raise
        self.fd = fd
        self._parent = parent
        self._closer = weakref.finalize(self, _close_fds, fd, parent)

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def create(self, name: str, mode: int = FILE_MODE) -> BinaryIO:
        """A new file ``name`` in the directory, open for writing (never an existing one)."""
        fd = os.open(name, _NEW_FILE_FLAGS, mode, dir_fd=self.fd)
        os.fchmod(fd, mode)
        return os.fdopen(fd, "wb")

    def write_atomic(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Write ``name`` completely under a temporary name, sync it, then rename it into
        place (replacing an older ``name``). On error the temporary file is removed and an
        :class:`OutputError` (or the writer's own exception) raised."""
        tmp = f".{name}.tmp"
        self.unlink(tmp)  # one left by an earlier failure; a link is removed, not followed
        try:
            with self.create(tmp) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            self.unlink(tmp)
            raise OutputError(f"{self.path}: cannot write {name}: {_why(e)}", e.errno) from None
        except BaseException:
            self.unlink(tmp)
            raise

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def reserve(self, name: str, size: int) -> None:
        """Hold ``size`` bytes of the filesystem in file ``name`` (released by unlinking
        it): room to write the last meta when the disk fills up."""
        with self.create(name) as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.write(bytes(size))  # a filesystem without fallocate
                f.flush()
                os.fsync(f.fileno())

    def remove(self) -> None:
        """Remove every file in the directory, then the directory (no partial output).
        Nothing once closed: by path it could be another directory by now."""
        if self.closed:
            return
        # What cannot go stays (rmdir then fails too): removing is best effort.
        for entry in os.listdir(self.fd):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=self.fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.name, dir_fd=self._parent)
        self.close()

    def close(self) -> None:
        self._closer()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_new_dir(path: str | os.PathLike[str]) -> None:
    """Check, before any work, that ``path`` can be made as a new output directory: its
    nearest existing ancestor is safe and ``path`` does not exist. The first directory that
    would be made is made on trial and removed again (nothing is left)."""
    p = Path(path)
    name = _name(p)
    fd, at, missing = _existing_ancestor(p, create=True)
    trial = missing[-1] if missing else name
    try:
        os.mkdir(trial, DIR_MODE, dir_fd=fd)
        os.rmdir(trial, dir_fd=fd)
    except FileExistsError:
        raise OutputError(f"{p}: output exists; choose a new directory", errno.EEXIST) from None
    except OSError as e:
        raise OutputError(f"{p}: cannot make it in {at}: {_why(e)}", e.errno) from None
    finally:
        os.close(fd)


def _open_file_parent(path: Path, force: bool) -> tuple[int, str]:
    name = _name(path)
    parent = _open_parent(path, create=False)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return parent, name
    except OSError as e:
        os.close(parent)
        raise OutputError(f"{path}: {_why(e)}", e.errno) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(parent)
        raise OutputError(
            f"{path}: exists and is not a regular file (a link, directory or device); "
            "not replaced: choose another name"
        )
    if not force:
        os.close(parent)
        raise OutputError(f"{path}: exists; pass --force to replace it", errno.EEXIST)
    return parent, name


def _new_temp(parent: int, name: str) -> tuple[str, int]:
    for _ in range(8):
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return tmp, os.open(tmp, _NEW_FILE_FLAGS, SINGLE_FILE_MODE, dir_fd=parent)
        except FileExistsError:
            continue
    raise OutputError(f"{name}: no free temporary name next to it")


def check_new_file(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Check, before any work, that the single file ``path`` can be written: a safe parent,
    not an existing file unless ``force``, never a link. A trial file is made and removed."""
    p = Path(path)
    parent, name = _open_file_parent(p, force)
    try:
        tmp, fd = _new_temp(parent, name)
        os.close(fd)
        os.unlink(tmp, dir_fd=parent)
    except OSError as e:
        raise OutputError(f"{p}: cannot write there: {_why(e)}", e.errno) from None
    finally:
        os.close(parent)


def write_file(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    force: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Write the single file ``path`` atomically: ``write`` fills a new temporary file next
    to it, ``verify`` (if given) checks it by path, then it takes the name. Without ``force``
    an existing ``path`` is refused (also one made meanwhile). On any error nothing is left."""
    p = Path(path)
    parent, name = _open_file_parent(p, force)
    tmp = ""
    try:
        tmp, fd = _new_temp(parent, name)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), SINGLE_FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(p.parent / tmp)
        if force:
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        else:
            _link_new(parent, tmp, name, p)
        tmp = ""
    except OSError as e:
        raise OutputError(f"{p}: cannot write: {_why(e)}", e.errno) from None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
        os.close(parent)


def _link_new(parent: int, tmp: str, name: str, p: Path) -> None:
    """Give ``tmp`` the name ``name`` unless that exists (a hard link never replaces)."""
    try:
        os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
    except FileExistsError:
        raise OutputError(f"{p}: exists; pass --force to replace it", errno.EEXIST) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links: the check above is the best there is.
        try:
            os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            return
        raise OutputError(f"{p}: exists; pass --force to replace it", errno.EEXIST) from None
    os.unlink(tmp, dir_fd=parent)
