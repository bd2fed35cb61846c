"""A sandbox for code Kiln should not trust (an agent's), from what the kernel offers.

No containers: the function runs in a child process that confines itself, for good,
before any of its code is unpickled or imported:

============== ===================================================================
layer          what it does
============== ===================================================================
landlock       file system: read-only on the interpreter, system libraries and the
               function's code folders (never their hidden entries, such as
               ``.git`` or ``.kiln``, nor the Kiln home), read-write on a private
               scratch folder (its ``HOME`` and ``TMPDIR``) and on ``write``
landlock-net   TCP bind and connect denied (unless ``network=True``)
landlock-scope signals and abstract unix sockets stay inside the sandbox
seccomp        system calls that reach beyond the process denied (see ``_seccomp``),
               sockets too unless ``network=True``
netns          a private network namespace with no interface but loopback
ipc-uts        its own System V IPC (no other process's shared memory) and host name
no-new-privs   no setuid or file capabilities gained by exec
capabilities   every capability dropped: root inside is not root-powerful
rlimits        address space (``memory``), CPU time (``cpu_time``), no core dumps
pids           a pids cgroup (``pids``), removed after; RLIMIT_NPROC when not root
clean-env      only PATH, locale, thread settings and HOME/TMPDIR=scratch: no
               tokens or credentials
============== ===================================================================

:func:`detect` says which layers this machine can give and why the others are
missing. A run that needs a missing layer is refused with :class:`SandboxError`.

Example::

    @app.function(sandbox=kiln.Sandbox(read=["/data/train"], write=["/data/out"],
                                       memory="1Gi", cpu_time=60))
    def train(lr: float) -> dict:
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import resource
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln._units import parse_memory
from kiln.errors import SandboxError, ValidationError
from kiln.govern import _landlock, _seccomp

# What every sandbox needs; the network ones when the network is closed.
REQUIRED = ("landlock", "seccomp", "no-new-privs", "capabilities", "rlimits", "pids",
            "clean-env")  # fmt: skip
REQUIRED_CLOSED = ("netns",)
AGENT_KINDS = frozenset({"agent"})
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
                "/etc/localtime", "/etc/nsswitch.conf", "/etc/passwd", "/etc/group",
                "/etc/hosts", "/etc/resolv.conf", "/etc/ssl", "/etc/ca-certificates",
                "/etc/mime.types", "/sys/devices/system/cpu")  # fmt: skip
_DEVICES_RW = ("/dev/null", "/dev/zero", "/dev/full")
_DEVICES_R = ("/dev/urandom", "/dev/random")
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 1, 38, 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_CLONE_NEWIPC, _CLONE_NEWUTS = 0x08000000, 0x04000000
_CAP_SYS_ADMIN = 21
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """What a sandboxed function may do; see the module docstring for how it is held.

    ``network``: open sockets (False: none at all). ``read`` and ``write``: folders or
    files it may read, or read and write, besides its code and its scratch folder.
    ``memory``: its address space (bytes or ``"512Mi"``; None: no limit; the
    function's ``memory`` request is not used, as an address space counts what is
    mapped, not what is used). ``pids``: processes and threads at once.
    ``cpu_time``: seconds of CPU before it is killed (None: no limit).

    Example::

        @app.function(sandbox=kiln.Sandbox(write=["/tmp/out"], memory="512Mi"))
        def step(x: int) -> int:
            return x + 1
    """

    network: bool = False
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    memory: int | str | None = None  # bytes once checked (see memory_bytes)
    pids: int = 64
    cpu_time: float | None = None  # seconds

    def __post_init__(self) -> None:
        if not isinstance(self.network, bool):
            raise ValidationError("sandbox.network", f"{self.network!r} is not True or False")
        set_ = functools.partial(object.__setattr__, self)
        set_("read", _paths("sandbox.read", self.read))
        set_("write", _paths("sandbox.write", self.write))
        if self.memory is not None:
            memory = parse_memory(self.memory, "sandbox.memory")
            if memory < 1 << 24:
                raise ValidationError("sandbox.memory", f"{memory} bytes cannot start Python",
                                      allowed="None, or at least 16Mi")  # fmt: skip
            set_("memory", memory)
        if isinstance(self.pids, bool) or not isinstance(self.pids, int) or self.pids < 1:
            raise ValidationError("sandbox.pids", f"{self.pids!r} is not a count",
                                  allowed="an int >= 1")  # fmt: skip
        cpu = self.cpu_time
        if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float)
                                or not math.isfinite(cpu) or cpu <= 0):  # fmt: skip
            raise ValidationError("sandbox.cpu_time", f"{cpu!r} is not a number of seconds",
                                  allowed="None, or seconds above 0")  # fmt: skip
        if cpu is not None:
            set_("cpu_time", float(cpu))

    @property
    def memory_bytes(self) -> int | None:
        """The address-space limit in bytes (None: none)."""
        return self.memory if isinstance(self.memory, int) else None

    def to_json(self) -> dict[str, Any]:
        """The plain form a task carries (and a run's record shows)."""
        return {"network": self.network, "read": list(self.read), "write": list(self.write),
                "memory": self.memory, "pids": self.pids, "cpu_time": self.cpu_time}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sandbox:
        return cls(network=data["network"], read=tuple(data["read"]),
                   write=tuple(data["write"]), memory=data["memory"], pids=data["pids"],
                   cpu_time=data["cpu_time"])  # fmt: skip

    def required(self) -> tuple[str, ...]:
        """The layers a run with this sandbox is refused without."""
        return REQUIRED + (() if self.network else REQUIRED_CLOSED)


def _paths(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str | os.PathLike):
        value = [value]
    if not isinstance(value, Iterable):
        raise ValidationError(name, f"{value!r} is not a list of paths")
    out = []
    for item in value:
        if not isinstance(item, str | os.PathLike) or not str(item):
            raise ValidationError(name, f"{item!r} is not a path", allowed="str or Path")
        out.append(os.path.realpath(Path(item).expanduser().absolute()))
    return tuple(out)


def required_for(kind: str) -> bool:
    """Whether every run of a principal of this ``kind`` must run sandboxed (an agent's)."""
    return kind in AGENT_KINDS


def forced(settings_sandbox: bool, server_url: str | None, token: str | None) -> bool:
    """Whether the engine must sandbox every run: ``KILN_SANDBOX=1``, or the server's
    token belongs to an agent (asked once per server and token; if the server cannot
    say, the answer is yes: an unknown caller is not trusted)."""
    if settings_sandbox:
        return True
    if not server_url or not token:
        return False
    return required_for(_principal_kind(server_url, token))


_kinds: dict[tuple[str, str], str] = {}  # (server, token): the principal's kind, once known


def _principal_kind(server_url: str, token: str) -> str:
    """The kind of the token's principal; ``agent`` while the server cannot say (asked
    again next time: a server briefly down must not sandbox a person for good)."""
    known = _kinds.get((server_url, token))
    if known is not None:
        return known
    from urllib.request import Request, urlopen

    request = Request(f"{server_url}/api/v1/whoami",  # noqa: S310  a checked http(s) URL
                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    try:
        with urlopen(request, timeout=10) as answer:  # noqa: S310
            kind = json.loads(answer.read(1 << 16)).get("kind")
    except (OSError, ValueError, AttributeError):
        return "agent"
    if not isinstance(kind, str):
        return "agent"
    if len(_kinds) < 64:
        _kinds[(server_url, token)] = kind
    return kind


# -- what the machine can give -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detection:
    """The layers this machine can give (name: detail) and, for the others, why not."""

    available: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    bubblewrap: str = "not installed"

    def check(self, sandbox: Sandbox) -> None:
        """Raise :class:`SandboxError` naming the first layer ``sandbox`` needs but lacks."""
        for layer in sandbox.required():
            if layer not in self.available:
                raise SandboxError(layer, self.missing.get(layer, "not available"))


@functools.cache
def detect() -> Detection:
    """What this machine can give, found once per process (without confining it)."""
    available: dict[str, str] = {}
    missing: dict[str, str] = {}
    if not sys.platform.startswith("linux"):
        reason = f"Landlock, seccomp and namespaces are Linux's; this is {sys.platform}"
        return Detection({}, {layer: reason for layer in (*REQUIRED, *REQUIRED_CLOSED)})
    version = _landlock.abi()
    for layer, needs in (("landlock", 1), ("landlock-net", 4), ("landlock-scope", 6)):
        if version >= needs:
            available[layer] = f"ABI {version}"
        else:
            missing[layer] = (
                f"the kernel's Landlock ABI is {version}, {needs} is needed"
                if version
                else "the kernel has no Landlock (or it is off)"
            )
    why = _seccomp.available()
    (missing if why else available)["seccomp"] = why or "libseccomp"
    for layer in ("no-new-privs", "capabilities", "rlimits", "clean-env"):
        available[layer] = "yes"
    why = _netns_missing()
    (missing if why else available)["netns"] = why or "unshare(CLONE_NEWNET)"
    pids = PidsGroup.parent()
    if pids is not None:
        available["pids"] = f"cgroup {pids}"
    elif os.geteuid() != 0:
        available["pids"] = "RLIMIT_NPROC"
    else:
        missing["pids"] = ("no writable pids cgroup (v1 /sys/fs/cgroup/pids, or v2 with pids "
                           "delegated), and root is not bound by RLIMIT_NPROC")  # fmt: skip
    bwrap = shutil.which("bwrap")
    note = f"installed ({bwrap}), not used: the layers are applied directly" if bwrap else (
        "not installed")  # fmt: skip
    return Detection(available, missing, note)


def _netns_missing() -> str | None:
    if os.geteuid() == 0:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError as exc:
            return f"cannot read /proc/self/status: {exc}"
        line = next((x for x in status.splitlines() if x.startswith("CapEff:")), "CapEff: 0")
        if int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1:
            return None
        return "root without CAP_SYS_ADMIN cannot make a network namespace"
    try:
        if int(Path("/proc/sys/user/max_user_namespaces").read_text()) == 0:
            return "user namespaces are off (user.max_user_namespaces = 0)"
        clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
        if clone.exists() and clone.read_text().strip() == "0":
            return "unprivileged user namespaces are off (kernel.unprivileged_userns_clone)"
    except (OSError, ValueError) as exc:
        return f"cannot tell whether user namespaces are allowed: {exc}"
    return None


# -- the pids cgroup ---------------------------------------------------------------


class PidsGroup:
    """A pids cgroup of one sandboxed run: made by its parent, joined by the child,
    emptied (every process in it killed) and removed when the run ends."""

    PREFIX = "kiln-sandbox-"

    def __init__(self, name: str, limit: int) -> None:
        parent = self.parent()
        if parent is None:
            raise SandboxError("pids", "no writable pids cgroup")
        self.path = parent / name
        self.path.mkdir(mode=0o755, exist_ok=True)
        (self.path / "pids.max").write_text(str(limit))

    @staticmethod
    @functools.cache
    def parent() -> Path | None:
        """The pids cgroup folder of this process, if it may make groups in it."""
        if os.geteuid() != 0:
            return None
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, where = line.split(":", 2)
            if "pids" in controllers.split(","):  # v1
                path = Path("/sys/fs/cgroup/pids") / where.lstrip("/")
                return path if os.access(path / "cgroup.procs", os.W_OK) else None
        for line in lines:
            if line.startswith("0::"):  # v2: pids must be handed to this group's children
                path = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                try:
                    if "pids" not in (path / "cgroup.subtree_control").read_text().split():
                        (path / "cgroup.subtree_control").write_text("+pids")
                except OSError:
                    return None
                return path
        return None

    def join(self) -> None:
        """Move the calling process into the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        """Kill whatever is left in the group, then remove it."""
        kill = self.path / "cgroup.kill"
        for _ in range(1000):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                break
            if kill.exists():
                kill.write_text("1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    @classmethod
    def sweep(cls, alive: Iterable[int]) -> None:
        """Remove groups left by sandboxes whose parent was killed (named by its pid)."""
        parent = cls.parent()
        if parent is None:
            return
        keep = {f"{cls.PREFIX}{pid}-" for pid in alive}
        for path in parent.glob(f"{cls.PREFIX}*"):
            if not any(path.name.startswith(k) for k in keep):
                with contextlib.suppress(OSError):
                    path.rmdir()


# -- confining a process -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """Where a sandboxed process lives: its scratch folder, the folders it reads
    (its code, the interpreter) and what inside them it must never see."""

    scratch: str
    code: tuple[str, ...]
    hidden: tuple[str, ...]  # the Kiln home, say: unreadable wherever it lies
    environ: dict[str, str]
    pids: PidsGroup | None
    cwd: str | None = None  # the driver's folder, as for a run outside a sandbox


def confine(sandbox: Sandbox, place: Place) -> tuple[str, ...]:
    """Confine this process for good, each layer or none; return the active layers.

    Raises :class:`SandboxError` if a layer that ``sandbox`` needs cannot be applied:
    the caller must then exit without running anything.
    """
    found = detect()
    found.check(sandbox)
    active: list[str] = []
    _prctl(_PR_SET_PDEATHSIG, 9)  # the zygote dies: so does this run
    _layer("pids", lambda: _limit_pids(sandbox, place), active)
    # Its own System V IPC and host name too: shared memory segments and semaphores of
    # other processes of the same user are out of reach.
    user = 0 if os.geteuid() == 0 else _CLONE_NEWUSER
    if not sandbox.network:
        flags = _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS | user
        _layer("netns", lambda: _check(_libc.unshare(flags)), active)
        active.append("ipc-uts")
    elif _libc.unshare(_CLONE_NEWIPC | _CLONE_NEWUTS | user) == 0:  # where it can: not needed
        active.append("ipc-uts")
    _layer("rlimits", lambda: _set_rlimits(sandbox), active)
    _layer("clean-env", lambda: _clean(place), active)
    _layer("no-new-privs", lambda: _prctl(_PR_SET_NO_NEW_PRIVS, 1), active)
    _layer("capabilities", _drop_capabilities, active)
    version = _landlock.abi()
    _layer("landlock", lambda: _landlock_fs(sandbox, place, version), active)
    if version >= 4 and not sandbox.network:
        active.append("landlock-net")
    if version >= 6:
        active.append("landlock-scope")
    _layer("seccomp", lambda: _seccomp.install(os.getpid(), network=sandbox.network), active)
    return tuple(active)


def _layer(name: str, apply: Any, active: list[str]) -> None:
    try:
        apply()
    except SandboxError:
        raise
    except (OSError, ValueError) as exc:
        raise SandboxError(name, f"applying it failed: {exc}") from None
    active.append(name)


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)))  # fmt: skip


def _limit_pids(sandbox: Sandbox, place: Place) -> None:
    if place.pids is not None:
        place.pids.join()
        return
    if os.geteuid() == 0:
        raise SandboxError("pids", "root is not bound by RLIMIT_NPROC and no cgroup was made")
    # RLIMIT_NPROC counts every process of the user: allow this many more than now.
    mine = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owned(p))
    resource.setrlimit(resource.RLIMIT_NPROC, (mine + sandbox.pids, mine + sandbox.pids))


def _owned(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.geteuid()
    except OSError:
        return False


def _set_rlimits(sandbox: Sandbox) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sandbox.memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (sandbox.memory_bytes, sandbox.memory_bytes))
    if sandbox.cpu_time is not None:
        seconds = math.ceil(sandbox.cpu_time)
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))


def _clean(place: Place) -> None:
    os.environ.clear()
    os.environ.update(place.environ)
    os.environ["HOME"] = os.environ["TMPDIR"] = place.scratch
    # The driver's folder, as outside a sandbox (relative paths mean the same; what may
    # be read there is Landlock's to say), else the scratch folder.
    os.chdir(place.cwd if place.cwd and Path(place.cwd).is_dir() else place.scratch)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))  # fmt: skip


def _drop_capabilities() -> None:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data))


def _landlock_fs(sandbox: Sandbox, place: Place, version: int) -> None:
    rules = _landlock.Ruleset(version, deny_tcp=not sandbox.network, scoped=True)
    read, every = _landlock.READ, rules.fs
    for path, rights in readable(place.code, place.hidden):
        rules.allow(path, rights)
    rules.allow_all(_existing(prefixes() | set(_SYSTEM_READ) | set(_DEVICES_R)), read)
    rules.allow(f"/proc/{os.getpid()}", read)
    rules.allow_all(_existing(_DEVICES_RW), read | _landlock.WRITE_FILE)
    rules.allow(place.scratch, every)
    for path in sandbox.read:
        _must_exist("sandbox.read", path)
        rules.allow(path, read)
    for path in sandbox.write:
        _must_exist("sandbox.write", path)
        rules.allow(path, every)
    rules.restrict()


def _existing(paths: Iterable[str]) -> list[str]:
    return sorted(p for p in paths if os.path.exists(p))  # noqa: PTH110


def _must_exist(name: str, path: str) -> None:
    if not os.path.exists(path):  # noqa: PTH110
        raise SandboxError("landlock", f"{name}: {path} does not exist on this machine")


def prefixes() -> set[str]:
    """The interpreter's folders: read-only in every sandbox, and never walked."""
    return {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            str(Path(sys.executable).resolve().parent.parent)}  # fmt: skip


@functools.lru_cache(maxsize=8)
def readable(code: tuple[str, ...], hidden: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Rules that let the code folders be read, but none of their hidden entries
    (``.git``, ``.kiln``, ``.ssh``, ``.env``, found down to HIDDEN_DEPTH folders deep)
    nor anything of ``hidden``: a folder holding one of those is listed, and its other
    entries are granted one by one. Cached: a zygote finds them once, its children
    reuse them."""
    own = prefixes()
    roots = [Path(c) for c in dict.fromkeys(code)
             if not any(c == p or c.startswith(p + os.sep) for p in own)]  # fmt: skip
    secret = {Path(h) for h in hidden} | set(_hidden_entries(roots))
    out: list[tuple[str, int]] = []
    for root in roots:
        if root.is_dir() and not any(root == s or s in root.parents for s in secret):
            out.extend(_beneath(root, secret))
    return tuple(out)


HIDDEN_DEPTH = 4
_WALK_BUDGET = 20_000  # folders looked into, in all


def _hidden_entries(roots: Iterable[Path]) -> Iterator[Path]:
    budget = _WALK_BUDGET
    for root in roots:
        stack = [(root, 0)]
        while stack and budget > 0:
            folder, depth = stack.pop()
            budget -= 1
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    yield Path(entry.path)
                elif depth < HIDDEN_DEPTH and entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), depth + 1))


def _beneath(folder: Path, secret: set[Path]) -> Iterator[tuple[str, int]]:
    holds = [s for s in secret if folder in s.parents]
    if not holds:
        yield str(folder), _landlock.READ
        return
    yield str(folder), _landlock.READ_DIR  # its names only
    try:
        children = list(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child in secret:
            continue
        if child.is_dir() and not child.is_symlink() and any(child in s.parents for s in holds):
            yield from _beneath(child, secret)
        else:
            yield str(child), _landlock.READ
