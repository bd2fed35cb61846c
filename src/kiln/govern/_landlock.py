"""Landlock, the kernel's unprivileged access control, through its three system calls.

Written with ctypes rather than taken from the PyPI ``landlock`` package: that one is
a development release that knows file-system rules only, while a sandbox needs TCP
rules (ABI 4) and the scopes of signals and abstract unix sockets (ABI 6) too. The
system call numbers are the generic ones, the same on x86_64 and aarch64.

A ruleset handles a set of access rights; the process then has only the rights its
rules grant beneath the folders (or files) they name. It is applied to the calling
thread with :func:`restrict`, irreversibly, and inherited by every child.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
from collections.abc import Iterable
from pathlib import Path

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2

# File-system rights, by the ABI that introduced them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights a rule on a file (not a folder) may grant.
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = EXECUTE | READ_FILE | READ_DIR
# Networking (ABI 4) and scopes (ABI 6).
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi() -> int:
    """The Landlock ABI of the running kernel; 0 when it has none (or it is disabled)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    try:
        return _syscall(_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))  # fmt: skip
    except OSError:
        return 0


def fs_rights(version: int) -> int:
    """Every file-system right the ABI ``version`` knows."""
    return _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= version)]


class Ruleset:
    """A ruleset being built; :meth:`restrict` applies it to this process."""

    def __init__(self, version: int, *, deny_tcp: bool, scoped: bool) -> None:
        self.version = version
        self.fs = fs_rights(version)
        attr = _RulesetAttr(self.fs, 0, 0)
        size = 8
        if deny_tcp and version >= 4:
            attr.handled_access_net, size = BIND_TCP | CONNECT_TCP, 16
        if scoped and version >= 6:
            attr.scoped, size = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL, 24
        self._fd = _syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                            ctypes.c_uint32(0))  # fmt: skip

    def allow(self, path: str | Path, rights: int) -> None:
        """Grant ``rights`` beneath ``path`` (masked to what a file may have, for a file)."""
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            allowed = rights & self.fs
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                allowed &= _FILE_RIGHTS
            attr = _PathBeneathAttr(allowed, fd)
            _syscall(_ADD_RULE, ctypes.c_int(self._fd), ctypes.c_int(_RULE_PATH_BENEATH),
                     ctypes.byref(attr), ctypes.c_uint32(0))  # fmt: skip
        finally:
            os.close(fd)

    def allow_all(self, paths: Iterable[str | Path], rights: int) -> None:
        for path in paths:
            self.allow(path, rights)

    def restrict(self) -> None:
        """Apply the ruleset to this process, for good (needs no_new_privs set first)."""
        try:
            _syscall(_RESTRICT_SELF, ctypes.c_int(self._fd), ctypes.c_uint32(0))
        finally:
            os.close(self._fd)
