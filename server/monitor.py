"""Resource monitor: snapshots of host, CUDA and Jetson memory and load, polled on a timer thread.

Readers are small functions over the library each device has: psutil for the host, ``torch.cuda.mem_get_info``
(and NVML for utilization, where installed) for a discrete GPU, jetson-stats' ``jtop`` on Jetson, where host and
GPU share one RAM (unified memory), so its reading replaces the host's as the memory the model competes for
(psutil's while jtop is down).
Every optional library is imported lazily, inside its reader: an x86 host never needs jetson-stats, and the HTTP
layer never imports torch. Request handlers only read the latest snapshot, so polling never blocks them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReading:
    total_bytes: int
    available_bytes: int
    utilization: float | None = None  # busy fraction 0..1 (CPU for the host, GPU engines elsewhere)

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.available_bytes


@dataclass(frozen=True)
class Snapshot:
    """Readings of every device at one time; ``primary`` names the memory the model's weights live in."""

    devices: dict[str, DeviceReading]
    primary: str
    taken_s: float = field(default_factory=time.monotonic)

    @property
    def available_bytes(self) -> int:
        return self.devices[self.primary].available_bytes


# ----------------------------------------------------------------------------------------------- readers
def read_host() -> DeviceReading:
    import psutil

    mem = psutil.virtual_memory()
    return DeviceReading(mem.total, mem.available, psutil.cpu_percent(interval=None) / 100.0)


def read_cuda(index: int = 0) -> DeviceReading:
    """Device memory of GPU ``index``: the driver's free bytes (``cudaMemGetInfo``, every process counted) plus the
    blocks this process's caching allocator holds but does not use, which the server reuses before it asks the
    driver for more, so counting them as used would read as pressure after every large prefill."""
    import torch

    cached = allocator_free_bytes(index)
    if torch.cuda.get_device_properties(index).is_integrated:
        # unified memory (a Jetson whose jtop is missing or failed to start): the driver's free bytes leave out
        # the page cache and buffers the kernel reclaims on demand (and swap), so a warm page cache would read as
        # pressure; the host's available memory is what the model competes for, as read_jtop counts it
        host = read_host()
        return DeviceReading(host.total_bytes, min(host.total_bytes, host.available_bytes + cached), None)
    free, total = torch.cuda.mem_get_info(index)
    return DeviceReading(total, min(total, free + cached), _nvml_utilization(index))


def allocator_free_bytes(index: int) -> int:
    """Bytes torch's caching allocator holds on GPU ``index`` without using them (0 before CUDA starts)."""
    import torch

    return max(0, torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))


def _nvml_utilization(index: int) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        import torch

        pynvml.nvmlInit()
        # NVML numbers every GPU of the machine, CUDA only the visible ones from 0: with CUDA_VISIBLE_DEVICES=2,
        # cuda:0 is NVML's GPU 2 (torch's own mapping, as torch.cuda.utilization uses it)
        to_nvml = getattr(torch.cuda, "_get_nvml_device_index", lambda i: i)
        handle = pynvml.nvmlDeviceGetHandleByIndex(to_nvml(index))
        return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except Exception:  # NVML missing from the driver, or a device it cannot see: no utilization, not an error
        return None


def read_jtop(jetson) -> DeviceReading:
    """A reading from a jtop object (``jtop.memory['RAM']`` in kB, ``jtop.stats['GPU']`` in percent).

    jetson-stats' ``used`` excludes buffers and page cache, which the kernel reclaims on demand, so
    available = total - used, as psutil's ``available`` is on a plain Linux host.
    """
    if not jetson.is_alive():  # its thread ends when the jtop service goes away, leaving the last data in place
        raise RuntimeError("jtop has stopped (is jtop.service running?): its memory reading would be stale")
    ram = jetson.memory["RAM"]
    total, used = int(ram["tot"]) * 1024, int(ram["used"]) * 1024
    gpu = (jetson.stats or {}).get("GPU")
    return DeviceReading(total, max(0, total - used), None if gpu is None else float(gpu) / 100.0)


class UnifiedReader:
    """Jetson's shared RAM as the model sees it: jtop's reading, plus the caching allocator's free blocks when the
    model runs on the GPU (as ``read_cuda`` counts them on an integrated GPU, else every large prefill would read
    as pressure: on Jetson those blocks are pinned NvMap memory, "used" for jtop and the kernel alike).

    When jtop stops mid-run (its service restarted or was upgraded: the client never reconnects) the RAM is read
    through psutil instead, without GPU load: the Monitor would otherwise keep jtop's last reading for good and
    the controller and residency would act on frozen memory while other processes fill the board.
    """

    def __init__(self, jetson, cuda_index: int | None):
        self.jetson, self.cuda_index = jetson, cuda_index
        self.jtop_error: Exception | None = None  # set while jtop fails (logged once)

    def __call__(self) -> DeviceReading:
        ram = self._read_ram()
        if self.cuda_index is None:
            return ram
        available = min(ram.total_bytes, ram.available_bytes + allocator_free_bytes(self.cuda_index))
        return DeviceReading(ram.total_bytes, available, ram.utilization)

    def _read_ram(self) -> DeviceReading:
        try:
            reading = read_jtop(self.jetson)
        except Exception as err:
            if self.jtop_error is None:
                log.warning("monitor: jtop failed (%s); reading the shared RAM through psutil, without GPU load", err)
            self.jtop_error = err
            host = read_host()
            return DeviceReading(host.total_bytes, host.available_bytes, None)  # host utilization is CPU load
        if self.jtop_error is not None:
            log.warning("monitor: jtop works again")
            self.jtop_error = None
        return reading


def open_jtop():
    """A started jtop client, or None off Jetson (no jetson-stats, or no jtop service running)."""
    try:
        from jtop import jtop
    except ImportError:
        return None
    try:
        jetson = jtop()
        jetson.start()
        return jetson
    except Exception as err:  # the package is installed but its service is not running
        log.warning("jetson-stats is installed but jtop cannot start (%s); using psutil", err)
        return None


def default_readers(device: str, jetson=None) -> tuple[dict[str, Callable[[], DeviceReading]], str]:
    """Readers for this machine and the name of the primary one (``jetson``, ``cuda:N`` or ``host``)."""
    readers: dict[str, Callable[[], DeviceReading]] = {"host": read_host}
    index = (int(device.split(":")[1]) if ":" in device else 0) if device.startswith("cuda") else None
    if jetson is not None:
        readers["jetson"] = UnifiedReader(jetson, index)
        return readers, "jetson"
    if index is not None:
        name = f"cuda:{index}"
        readers[name] = lambda: read_cuda(index)
        return readers, name
    return readers, "host"


# ----------------------------------------------------------------------------------------------- monitor
class _TimedReader:
    """A reader on its own daemon thread, waited on with a deadline: a call that hangs (a jtop socket that
    stalls, a wedged driver) is left running and waited on again at the next poll, never started twice, and never
    holds up the other readers or the listeners (the whole monitor used to freeze on it)."""

    def __init__(self, name: str, read: Callable[[], DeviceReading]):
        self.name, self.read = name, read
        self._asked, self._done = threading.Event(), threading.Event()
        self._outcome: tuple[bool, object] | None = None
        self._busy = self._closed = False
        threading.Thread(target=self._serve, name=f"uniql-read-{name}", daemon=True).start()

    def close(self) -> None:
        """Let the thread end: now when idle, else once the call it is in returns."""
        self._closed = True
        self._asked.set()

    def __call__(self, timeout_s: float) -> DeviceReading:
        if not self._busy:  # else the last call still runs: wait for it instead of queueing another
            self._busy = True
            self._done.clear()
            self._asked.set()
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"no reading within {timeout_s:g} s (the call still runs)")
        self._busy = False
        ok, value = self._outcome
        if ok:
            return value
        raise value

    def _serve(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            if self._closed:
                return
            try:
                self._outcome = (True, self.read())
            except BaseException as err:  # even SystemExit: this call failed, the thread and the monitor go on
                self._outcome = (False, err if isinstance(err, Exception) else RuntimeError(f"{type(err).__name__}"))
            finally:
                self._done.set()


class Monitor:
    """Polls the readers every ``interval_s`` on a daemon thread; ``snapshot()`` returns the latest, at once.

    ``listeners`` run after each poll on the monitor thread (metrics gauges, the residency manager), so the
    slow work of reacting to memory pressure never runs inside a request handler. A reader that fails, or takes
    longer than ``read_timeout_s``, keeps its last reading; the primary one must succeed once at start, since
    every decision needs its memory.
    """

    def __init__(self, readers: dict[str, Callable[[], DeviceReading]], primary: str, interval_s: float = 0.5,
                 start_attempts: int = 3, retry_s: float = 0.2, read_timeout_s: float = 2.0):
        if primary not in readers:
            raise ValueError(f"primary device {primary!r} has no reader ({sorted(readers)})")
        # 0 would poll in a busy loop; above TIMEOUT_MAX (inf included) Event.wait raises and the thread dies
        for what, seconds in (("interval", interval_s), ("read timeout", read_timeout_s)):
            if not 0 < seconds <= threading.TIMEOUT_MAX:
                raise ValueError(f"the monitor {what} must be > 0 and <= {threading.TIMEOUT_MAX:.0f} seconds, "
                                 f"got {seconds}")
        self.readers, self.primary, self.interval_s = readers, primary, interval_s
        self.read_timeout_s = read_timeout_s
        self._timed: dict[str, _TimedReader] = {}  # one thread per reader, made at its first poll
        self.listeners: list[Callable[[Snapshot], None]] = []
        self._failing: dict[str, Exception] = {}  # reader -> its last error, logged once until it recovers
        self._latest = self._first_poll(start_attempts, retry_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _first_poll(self, attempts: int, retry_s: float) -> Snapshot:
        """A snapshot holding the primary reading: a transient failure (a busy driver) is retried briefly; a lasting
        one is a clear error at start instead of a KeyError in every later request."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(retry_s)
            snapshot = self.poll()
            if self.primary in snapshot.devices:
                return snapshot
        err = self._failing[self.primary]
        raise RuntimeError(f"cannot read memory of {self.primary}: {type(err).__name__}: {err}") from err

    def poll(self) -> Snapshot:
        previous = getattr(self, "_latest", None)
        devices = {}
        for name, read in self.readers.items():
            timed = self._timed.get(name)
            if timed is None or timed.read is not read:  # a reader swapped in after start gets its own thread
                if timed is not None:
                    timed.close()
                timed = self._timed[name] = _TimedReader(name, read)
            try:
                devices[name] = timed(self.read_timeout_s)
            except Exception as err:  # a flaky reader must not take the server down; keep the last value
                self._note_failure(name, err)
                if previous is not None and name in previous.devices:
                    devices[name] = previous.devices[name]
            else:
                if self._failing.pop(name, None) is not None:
                    log.warning("monitor: reading %s works again", name)
        return Snapshot(devices, self.primary)

    def _note_failure(self, name: str, err: Exception) -> None:
        """Log a reader's failure once (it is polled twice a second), not at every poll."""
        if name not in self._failing:
            log.warning("monitor: reading %s failed (%s); keeping its last reading", name, err)
        self._failing[name] = err

    def snapshot(self) -> Snapshot:
        return self._latest

    def refresh(self) -> Snapshot:
        """Poll now and notify the listeners (the timer thread calls this; tests may too)."""
        self._latest = self.poll()
        for listener in list(self.listeners):
            try:
                listener(self._latest)
            except Exception:
                log.exception("monitor listener failed")
        return self._latest

    def start(self) -> Monitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="uniql-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # a dead thread would freeze the snapshot silently; keep the last one and go on
                log.exception("monitor: poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for timed in self._timed.values():  # a later refresh() starts fresh reader threads
            timed.close()
        self._timed.clear()
