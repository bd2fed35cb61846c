"""How each run uses the machine, sampled beside it: ``sys/...`` metrics and usage.

One sampler thread per process samples every run open in it (``app.run``, a worker's
task, a Ray task) with psutil: the process tree's CPU (``sys/cpu_cores``: CPUs busy
on average since the last sample), resident memory, major page faults, disk bytes,
open files and threads; the machine's swap in/out and network bytes (no per-process
figure exists for either); and, where NVML sees the run's GPUs (its
``CUDA_VISIBLE_DEVICES``, else every device), each device's utilisation, the memory
the run's processes hold on it, power and temperature. Counters are recorded as the
amount since the last sample. The first sample is taken 1 s after the run starts
and the interval widens with the run's age (:func:`interval_s`) up to 30 s, so a
long run costs a few hundred points an hour. A run shorter than the first interval
has no ``sys/`` points; its usage still holds CPU seconds, peak memory, major faults
and disk bytes (kernel counts, see :mod:`kiln.record.runs`).

At the run's end the sampler adds to its usage what right-sizing needs
(``cpu_cores_mean``, ``peak_rss_tree_bytes``, ``swap_in_bytes``, ``swap_out_bytes``,
``gpu_utilization_mean``, ``gpu_memory_peak_bytes``, ``gpu_samples``). A process the
sampler may not read (another user's child), NVML missing or failing: the figures
it could not read are left out, and the run goes on unaffected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.record.runs import ActiveRun
    from kiln.record.store.base import MetricRow

# Each run's sys/ metrics, as `kiln runs show --metrics` lists them (GPUs add
# sys/gpuN/utilization_percent, memory_bytes, device_memory_bytes, power_watts and
# temperature_c).
SYS_KEYS = (
    "sys/cpu_cores", "sys/rss_bytes", "sys/major_faults", "sys/swap_in_bytes",
    "sys/swap_out_bytes", "sys/disk_read_bytes", "sys/disk_write_bytes", "sys/net_sent_bytes",
    "sys/net_recv_bytes", "sys/open_files", "sys/threads",
)  # fmt: skip
FIRST_S = 1.0
BASELINE_S = 0.1  # a run this old is read once, unrecorded: counters count from there
LONGEST_S = 30.0
_log = logging.getLogger("kiln")


def interval_s(age_s: float) -> float:
    """The wait before the next sample of a run ``age_s`` old: 1 s for its first
    minute, then 2% of its age, at most 30 s."""
    return min(LONGEST_S, max(FIRST_S, 0.02 * age_s))


@dataclass
class _Watched:
    run: ActiveRun
    started: float  # monotonic
    due: float
    own_cpu_s: float  # this process's CPU seconds as the run started
    at: float  # monotonic time of the last sample
    started_at: float = field(default_factory=time.time)
    cpu_by_pid: dict[int, float] = field(default_factory=dict)  # at the last sample
    samples: int = 0
    machine: dict[str, float] = field(default_factory=dict)  # counters at the last sample
    faults: int | None = None
    disk: tuple[int, int] | None = None
    cpu_sum: float = 0.0  # CPU seconds over the sampled intervals
    cpu_time: float = 0.0  # and their length: the mean weighs each by its length
    cpu_n: int = 0
    peak_rss: int = 0
    swap0: tuple[float, float] | None = None
    swap: tuple[float, float] = (0.0, 0.0)
    gpu_util: list[float] = field(default_factory=list)
    gpu_mem_peak: int = 0


class Sampler:
    """The process's sampler thread (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        # Held while a sample is taken and recorded: a run's end waits for the sample in
        # flight, so every sample its usage counts has its points recorded before the
        # run's recorder is flushed (none arrives after, none is dropped).
        self._sampling = threading.Lock()
        self._runs: dict[str, _Watched] = {}
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._nvml_tried = False

    def watch(self, run: ActiveRun) -> Callable[[], dict[str, Any]] | None:
        """Start sampling ``run`` (see :func:`kiln.record.runs.watch_runs`)."""
        if not run.sys_metrics:
            return None
        now, times = time.monotonic(), os.times()
        watched = _Watched(run, now, now + BASELINE_S, times.user + times.system, now)
        with self._lock:
            self._runs[run.id] = watched
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kiln-sysmetrics",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._lock.notify()
        return lambda: self._stop(watched)

    def _stop(self, watched: _Watched) -> dict[str, Any]:
        with self._sampling, self._lock:
            self._runs.pop(watched.run.id, None)
        usage: dict[str, Any] = {}
        if watched.cpu_n:
            usage["cpu_cores_mean"] = round(watched.cpu_sum / watched.cpu_time, 4)
            usage["peak_rss_tree_bytes"] = watched.peak_rss
            usage["swap_in_bytes"], usage["swap_out_bytes"] = watched.swap
            usage["sys_samples"] = watched.cpu_n
        if watched.gpu_util:
            usage["gpu_utilization_mean"] = round(sum(watched.gpu_util) / len(watched.gpu_util), 2)
            usage["gpu_memory_peak_bytes"] = watched.gpu_mem_peak
            usage["gpu_samples"] = len(watched.gpu_util)
        return usage

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._runs:
                    self._thread = None
                    return
                now = time.monotonic()
                due = [w for w in self._runs.values() if w.due <= now]
                if not due:
                    self._lock.wait(min(w.due for w in self._runs.values()) - now)
                    continue
            for watched in due:
                with self._sampling:
                    if watched.run.id not in self._runs:  # ended meanwhile
                        continue
                    self._take(watched)

    def _take(self, watched: _Watched) -> None:
        try:
            rows = self.sample(watched)
        except Exception as exc:  # never the run's problem
            _log.debug("kiln: sampling run %s failed: %s", watched.run.id, exc)
            rows = []
        age = time.monotonic() - watched.started
        watched.due = time.monotonic() + (
            FIRST_S - age if watched.samples == 0 else interval_s(age)
        )
        if rows:
            with contextlib.suppress(Exception):
                watched.run.record_points(rows)

    def sample(self, w: _Watched) -> list[MetricRow]:
        """One sample of the run ``w`` (its ``sys/...`` rows), updating its totals."""
        import psutil

        run_id, now = w.run.id, time.time()
        values: dict[str, float] = {}
        procs = _tree(psutil.Process())
        used = rss = fds = threads = 0.0
        faults = 0
        read = written = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error, OSError), proc.oneshot():
                times = proc.cpu_times()
                used += self._cpu_since(w, proc, times.user + times.system)
                rss += proc.memory_info().rss
                threads += proc.num_threads()
                fds += proc.num_fds()
                faults += _major_faults(proc.pid)
                with contextlib.suppress(psutil.Error, OSError, AttributeError):
                    io = proc.io_counters()
                    read += io.read_bytes
                    written += io.write_bytes
        mono = time.monotonic()  # after the reads (the first imports psutil, not quick)
        if mono > w.at:
            cores = used / (mono - w.at)
            values["sys/cpu_cores"] = cores
            w.cpu_sum += used
            w.cpu_time += mono - w.at
            w.cpu_n += 1
        w.at = mono
        values["sys/rss_bytes"] = rss
        w.peak_rss = max(w.peak_rss, int(rss))
        values["sys/open_files"], values["sys/threads"] = fds, threads
        if w.faults is not None:
            values["sys/major_faults"] = max(0, faults - w.faults)
        w.faults = faults
        if w.disk is not None:
            values["sys/disk_read_bytes"] = max(0, read - w.disk[0])
            values["sys/disk_write_bytes"] = max(0, written - w.disk[1])
        w.disk = (read, written)
        self._machine(w, values)
        self._gpus(w, {p.pid for p in procs}, values)
        w.samples += 1
        if w.samples == 1:  # the baseline: what follows counts from here
            return []
        return [(run_id, key, w.samples - 1, now, float(v)) for key, v in values.items()]

    @staticmethod
    def _cpu_since(w: _Watched, proc: Any, cpu_s: float) -> float:
        """CPU seconds ``proc`` used since the last sample: for a process first seen,
        since the run started (this process), since it was born (a child born during
        the run) or nothing (a child older than the run: from now on)."""
        last = w.cpu_by_pid.get(proc.pid)
        if last is None:
            if proc.pid == os.getpid():
                last = w.own_cpu_s
            elif proc.create_time() >= w.started_at:
                last = 0.0
            else:
                last = cpu_s
        w.cpu_by_pid[proc.pid] = cpu_s
        return max(0.0, cpu_s - last)

    def _machine(self, w: _Watched, values: dict[str, float]) -> None:
        import psutil

        counters: dict[str, float] = {}
        with contextlib.suppress(Exception):
            swap = psutil.swap_memory()
            counters["sys/swap_in_bytes"], counters["sys/swap_out_bytes"] = swap.sin, swap.sout
            if w.swap0 is None:
                w.swap0 = (swap.sin, swap.sout)
            w.swap = (swap.sin - w.swap0[0], swap.sout - w.swap0[1])
        with contextlib.suppress(Exception):
            net = psutil.net_io_counters()
            counters["sys/net_sent_bytes"], counters["sys/net_recv_bytes"] = (
                net.bytes_sent, net.bytes_recv)  # fmt: skip
        for key, value in counters.items():
            if key in w.machine:
                values[key] = max(0.0, value - w.machine[key])
        w.machine = counters

    def _gpus(self, w: _Watched, pids: set[int], values: dict[str, float]) -> None:
        if not self._nvml_tried:
            self._nvml_tried = True
            self._nvml = _Nvml.open()
        if self._nvml is None:
            return
        for index, figures in self._nvml.sample(pids).items():
            for name, value in figures.items():
                values[f"sys/gpu{index}/{name}"] = value
            w.gpu_util.append(figures.get("utilization_percent", 0.0))
            w.gpu_mem_peak = max(w.gpu_mem_peak, int(figures.get("memory_bytes", 0)))


def _tree(proc: Any) -> list[Any]:
    """The process and every descendant it can see."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _major_faults(pid: int) -> int:
    """The major page faults of process ``pid`` (Linux; 0 where unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # noqa: PTH123  psutil has no such call
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[9])  # majflt, the 12th field, 10th after the name
    except (OSError, IndexError, ValueError):
        return 0


class _Nvml:
    """The run's GPUs through NVML (nvidia-ml-py), if it can be loaded."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # not installed, no driver, no device: no GPU figures
            _log.debug("kiln: no GPU metrics: %s", exc)
            return None
        handles: list[Any] = []  # as the run numbers them: its cuda:0 first
        for device in _visible(os.environ.get("CUDA_VISIBLE_DEVICES"), count):
            try:
                handles.append(pynvml.nvmlDeviceGetHandleByIndex(device) if isinstance(
                    device, int) else pynvml.nvmlDeviceGetHandleByUUID(device))  # fmt: skip
            except Exception as exc:
                _log.debug("kiln: no GPU metrics of device %s: %s", device, exc)
                break
        return cls(pynvml, handles) if handles else None

    def sample(self, pids: set[int]) -> dict[int, dict[str, float]]:
        nvml, found = self._nvml, {}
        for index, handle in enumerate(self._handles):
            figures: dict[str, float] = {}
            with contextlib.suppress(Exception):
                figures["utilization_percent"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            with contextlib.suppress(Exception):
                held = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                figures["memory_bytes"] = sum(p.usedGpuMemory or 0 for p in held if p.pid in pids)
            with contextlib.suppress(Exception):
                figures["device_memory_bytes"] = nvml.nvmlDeviceGetMemoryInfo(handle).used
            with contextlib.suppress(Exception):
                figures["power_watts"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
            with contextlib.suppress(Exception):
                figures["temperature_c"] = nvml.nvmlDeviceGetTemperature(
                    handle, nvml.NVML_TEMPERATURE_GPU)  # fmt: skip
            if figures:
                found[index] = figures
        return found


def _visible(cuda_visible: str | None, count: int) -> list[Any]:
    """The devices ``CUDA_VISIBLE_DEVICES`` names (indices or UUIDs), else all of them."""
    if cuda_visible is None:
        return list(range(count))
    found: list[Any] = []
    for part in (p.strip() for p in cuda_visible.split(",")):
        if part.isdigit() and int(part) < count:
            found.append(int(part))
        elif part.startswith(("GPU-", "MIG-")):
            found.append(part)
        else:
            break  # CUDA stops at the first entry it cannot use
    return found


_sampler = Sampler()


def watch(run: ActiveRun) -> Callable[[], dict[str, Any]] | None:
    """The watcher the SDK registers with :func:`kiln.record.runs.watch_runs`."""
    return _sampler.watch(run)
