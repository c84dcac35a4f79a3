"""The admin socket: a UNIX socket only its owner can use, made without a moment when others could.

`bind_private` (blocking: run it in a thread) binds the socket inside a fresh
private directory (mode 0700), makes it mode 0600, and only then renames it to
its place: there is never a moment when the file is reachable with wider
permissions, whatever the umask or the mode of the directory it lives in.  A
stale socket (nothing answers on it) is replaced; a live one (another master)
or a file that is not a socket is refused.

A UNIX socket's name may be at most about 107 bytes; a longer path is reached
through ``/proc/self/fd`` and a descriptor of its directory (`reachable`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

from twisted.internet import tcp, unix

# The admin socket's file name in the master's data directory.
ADMIN_SOCKET_NAME = "admin.sock"
# Longest path bind() and connect() take (sun_path is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107
# Connections waiting to be accepted.
BACKLOG = 16


def admin_socket_path(data_dir: str) -> str:
    """Where the master of ``data_dir`` listens for the admin tool."""
    return os.path.join(data_dir, ADMIN_SOCKET_NAME)


class SocketInUse(OSError):
    """Something else holds the socket's path: a live socket, or a file that is not a socket."""


@contextlib.contextmanager
def reachable(path: str) -> Iterator[str]:
    """A name for ``path`` that bind() and connect() take, valid inside the ``with`` block.

    A short path is itself; a longer one goes through a descriptor of its
    directory (``/proc/self/fd/N/NAME``, Linux).
    """
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield path
        return
    directory, name = os.path.split(path)
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.ENAMETOOLONG, f"the socket path is longer than {MAX_SOCKET_PATH} bytes", path)
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{fd}/{name}"
        if len(os.fsencode(short)) > MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, "the socket's file name is too long", path)
        yield short
    finally:
        os.close(fd)


def answers(path: str) -> bool:
    """Whether something accepts connections on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with reachable(path) as name:
            probe.connect(name)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_private(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking socket at ``path`` (mode 0600), and its file's (device, inode).

    Blocking file work: run it in a thread.  Raises SocketInUse if another
    process listens at ``path`` or ``path`` is not a socket.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(errno.EEXIST, "it exists and is not a socket; move it away", path)
        if answers(path):
            raise SocketInUse(errno.EADDRINUSE, "another process (a master?) is listening on it", path)
    private = tempfile.mkdtemp(prefix=".admin-", dir=os.path.dirname(path))  # mode 0700
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        inner = os.path.join(private, "s")
        with reachable(inner) as name:
            listening.bind(name)
        os.chmod(inner, 0o600)
        listening.listen(BACKLOG)
        listening.setblocking(False)
        os.rename(inner, path)  # replaces a stale socket in one step
        done = os.lstat(path)
    except BaseException:
        listening.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(private, "s"))
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return listening, (done.st_dev, done.st_ino)


def remove_if_same(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one of ``identity`` (not a later master's)."""
    with contextlib.suppress(OSError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == identity:
            os.unlink(path)


class PrivatePort(unix.Port):
    """A listening port over a socket from `bind_private`; when it stops, it removes its own file.

    Twisted's own adoption of a UNIX socket (``adoptStreamPort``) would make
    its file mode 0666 and later remove the name it was bound under (which
    after the rename is elsewhere), so the port is built here with the
    socket as its pre-existing one, mode 0600, and removes the file only if it
    is still this socket's (a test checks the mode stays 0600).
    """

    identity: tuple[int, int]

    @classmethod
    def adopt(cls, reactor: Any, listening: socket.socket, identity: tuple[int, int], path: str, factory: Any) -> Any:
        """Listen with ``factory`` on ``listening``, a socket from `bind_private` for ``path`` (the port takes it)."""
        port = cls(os.fsencode(path), factory, backlog=BACKLOG, mode=0o600, reactor=reactor)
        port._preexistingSocket = listening
        port.identity = identity
        port.startListening()
        return port

    def connectionLost(self, reason: Any) -> None:
        remove_if_same(os.fsdecode(self._bindPath), self.identity)
        tcp.Port.connectionLost(self, reason)
