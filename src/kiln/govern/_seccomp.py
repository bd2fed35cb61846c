"""The system-call filter of a sandbox (seccomp, through libseccomp's ``pyseccomp``).

Everything is allowed except what lets code reach beyond its process: debugging and
reading other processes, mounting, loading kernel code, namespaces, keyrings,
io_uring (whose operations seccomp never sees), signals to other processes, leaving
the engine's process group (so a timeout or cancel still kills every process the
function made), typing into the terminal, and, unless the network is allowed,
making sockets. A denied call fails with EPERM, so the function gets a
``PermissionError`` that names what it tried; ``clone3`` fails with ENOSYS (its flags
are in memory a filter cannot read), and the C library falls back to ``clone``.

``pyseccomp`` loads libseccomp when imported: import it before Landlock is applied.
"""

from __future__ import annotations

import errno
from typing import Any

_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_send_signal",
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "kexec_load", "kexec_file_load", "bpf",
    "perf_event_open", "init_module", "finit_module", "delete_module", "unshare", "setns",
    "keyctl", "add_key", "request_key", "userfaultfd", "open_by_handle_at",
    "name_to_handle_at", "reboot", "swapon", "swapoff", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "setsid", "setpgid", "acct", "quotactl", "syslog", "vhangup",
    "iopl", "ioperm", "fanotify_init", "lookup_dcookie", "uselib",
)  # fmt: skip
# Signals go to this process only (arg 0 is the target's pid, or its thread group).
_SIGNALS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
               0x40000000, 0x00000080)  # fmt: skip
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C


def available() -> str | None:
    """None if a filter can be loaded here, else why not."""
    try:
        import pyseccomp  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"libseccomp or the pyseccomp package is missing ({exc})"
    return None


def install(pid: int, *, network: bool) -> None:
    """Load the filter into this process (and every child it makes), for good."""
    import pyseccomp as sc

    deny = sc.ERRNO(errno.EPERM)
    f: Any = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED:
        _rule(f, deny, name)
    for name in _SIGNALS:
        _rule(f, deny, name, sc.Arg(0, sc.NE, pid))
    for flag in _NAMESPACES:
        _rule(f, deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    _rule(f, sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (_TIOCSTI, _TIOCLINUX):
        _rule(f, deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    if not network:
        _rule(f, deny, "socket")
    f.load()


def _rule(f: Any, action: int, name: str, *args: Any) -> None:
    import pyseccomp as sc

    try:
        number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    except (OSError, ValueError):
        return  # not a system call of this architecture: nothing to deny
    if number < 0:
        return
    f.add_rule(action, number, *args)
