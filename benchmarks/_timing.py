"""Measurement machinery shared by the benchmark scripts.

* A/B rounds in rotating order with stalled-round rejection (`run_rounds`), optionally after waiting for the
  machine to go idle (``--wait_idle``), and the share of the CPUs other processes used meanwhile;
* step timers: ``time.perf_counter`` on CPU, CUDA events (after a synchronisation) on a GPU (`make_timer`);
* memory: bytes autograd saves for backward (`saved_tensor_bytes`), the peak of live tensor bytes on CPU
  (`PeakTensorBytes`, a dispatch mode that follows every storage), ``torch.cuda.max_memory_allocated`` on a GPU;
* statistics (medians, IQRs, per-round ratios), torch.profiler op diffs, and a description of the machine.

The scripts import it as ``import _timing`` (they run as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 1024 * 1024
GiB = 1024**3


# -- command line -----------------------------------------------------------------------------------------------
def add_timing_args(
    p: argparse.ArgumentParser, *, repeats: int, warmup: int, max_seconds: float, threads: Optional[int] = None
) -> None:
    """The options every script shares: rounds, warm-up, threads, seed, stall rejection, time budget, idle wait."""
    p.add_argument("--repeats", type=int, default=repeats, help="measured rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=warmup, help="unmeasured warm-up rounds")
    p.add_argument("--threads", type=int, default=threads or os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stall_factor",
        type=float,
        default=1.5,
        help="discard a round when some variant took more than this × its fastest round (host contention)",
    )
    p.add_argument("--max_seconds", type=float, default=max_seconds, help="time budget of each timing phase")
    p.add_argument(
        "--wait_idle",
        type=float,
        default=0.0,
        help="before each timing phase, wait up to this many seconds for other processes to leave the CPUs idle",
    )


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if any)"
    )


def check_timing_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 0 or args.stall_factor <= 1.0:
        p.error("--repeats must be >= 1, --warmup >= 0 and --stall_factor > 1")


# -- CPU load ---------------------------------------------------------------------------------------------------
def cpu_busy_seconds() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot, from /proc/stat (None where unavailable)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_for_idle(max_wait: float, window: float = 2.0, threshold: float = 0.05) -> None:
    """Sleep until other processes use under ``threshold`` of the CPUs over ``window`` s, at most ``max_wait`` s."""
    end = time.perf_counter() + max_wait
    while time.perf_counter() < end:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        b1 = cpu_busy_seconds()
        if b0 is None or b1 is None or (b1 - b0) / (window * (os.cpu_count() or 1)) < threshold:
            return
    print(f"(CPUs still busy after waiting {max_wait:.0f} s; timing anyway)", file=sys.stderr)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve tensors up to 32 MiB from the heap and to keep freed memory (``mallopt``).

    By default every large tensor is ``mmap``-ed and returned to the system when freed, so each training step
    page-faults its activations in anew: kernel time that varies from step to step on a VM and widened the per-round
    ratios' IQR from ±0.5 % to ±5 % here. Same setting for every variant. Returns whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 32 * MB), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * MB))
    )


# -- timers -----------------------------------------------------------------------------------------------------
Timer = Callable[[Callable[[], Any]], float]


def make_timer(device: torch.device) -> Timer:
    """``timer(fn)`` → seconds ``fn()`` took: ``perf_counter`` on CPU; on CUDA, events recorded around ``fn`` after a
    synchronisation (so earlier work is not billed to it), read after the end event completes."""
    if device.type != "cuda":

        def timed(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return timed

    def timed_cuda(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timed_cuda


# -- rounds -----------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """Bookkeeping of one timing phase: measured rounds kept and discarded."""

    name: str
    kept: int = 0
    discarded: int = 0
    out_of_time: bool = False
    foreign_cpu: Optional[float] = None  # share of all CPUs used by other processes while timing

    def summary(self, label: str, stall_factor: float, repeats: int) -> list[str]:
        """One line on rounds used/discarded and foreign load, plus a WARNING line when the phase was disturbed."""
        note = " (stopped by --max_seconds)" if self.out_of_time else ""
        others = "" if self.foreign_cpu is None else f"; other processes used {100 * self.foreign_cpu:.0f}% of the CPUs"
        lines = [
            f"{label}: {self.kept} rounds used, {self.discarded} discarded as stalled "
            f"(a variant > {stall_factor}× its fastest round){others}{note}"
        ]
        if self.kept < repeats or self.discarded > self.kept // 4 or (self.foreign_cpu or 0.0) > 0.1:
            lines.append(
                f"WARNING: {label} timings were disturbed by other load on this machine; rerun when it is idle."
            )
        return lines


def clean_rows(rows: list[list[float]], factor: float) -> list[list[float]]:
    """Rounds in which every variant took at most ``factor`` × its fastest time over all rounds."""
    fastest = [min(col) for col in zip(*rows, strict=True)]
    return [row for row in rows if all(t <= factor * f for t, f in zip(row, fastest, strict=True))]


def run_rounds(
    steps: Sequence[Callable[[Any], float]],
    make_input: Callable[[], Any],
    args: argparse.Namespace,
    name: str = "",
) -> tuple[Phase, list[list[float]]]:
    """Time ``steps`` in rounds; each round draws one input and runs every step once on it.

    The order rotates (A B C, B C A, C A B, ...) so that every variant takes every position equally often and
    never follows itself. Rounds where another process stole the CPU (some variant slower than
    ``args.stall_factor`` × its fastest round) are discarded, and rounds continue until ``args.repeats`` clean ones
    are in or ``args.max_seconds`` have passed; the first ``args.warmup`` rounds are not recorded. GC is off while
    timing. Each step returns the seconds it took (the work it does outside its clock is not counted).

    Returns:
        The phase's bookkeeping and the kept rounds, ``rows[round][variant]`` in seconds.
    """
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    rows: list[list[float]] = []
    kept: list[list[float]] = []
    deadline = time.perf_counter() + args.max_seconds
    phase = Phase(name)
    gc.collect()
    busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    gc.disable()
    try:
        rnd = 0
        while True:
            batch = make_input()
            k = rnd % len(steps)
            row = [0.0] * len(steps)
            for i in [*range(k, len(steps)), *range(k)]:
                row[i] = steps[i](batch)
            if rnd >= args.warmup:
                rows.append(row)
                kept = clean_rows(rows, args.stall_factor)
                if len(kept) >= args.repeats:
                    break
            rnd += 1
            if time.perf_counter() > deadline:
                phase.out_of_time = True
                break
    finally:
        gc.enable()
    busy1, own1, wall1 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if busy0 is not None and busy1 is not None:
        foreign = (busy1 - busy0) - (own1 - own0)
        phase.foreign_cpu = max(0.0, foreign) / ((wall1 - wall0) * (os.cpu_count() or 1))
    kept = kept[: args.repeats]
    phase.kept, phase.discarded = len(kept), len(rows) - len(kept)
    return phase, kept


def columns(rows: list[list[float]]) -> list[list[float]]:
    """``rows[round][variant]`` → ``cols[variant][round]``."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else []


# -- statistics -------------------------------------------------------------------------------------------------
def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and IQR of the per-round ratios num[i] / den[i]."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    lo, hi = quartiles(ratios)
    return statistics.median(ratios), lo, hi


def fmt_ratio(num: list[float], den: list[float]) -> str:
    """``median [q1–q3]`` of the per-round ratios."""
    r, lo, hi = ratio_stats(num, den)
    return f"{r:.3f} [{lo:.3f}–{hi:.3f}]"


def fmt_ms(times: list[float]) -> str:
    """``median (q1–q3)`` in ms."""
    q1, q3 = quartiles(times)
    return f"{median_ms(times):.2f} ({1e3 * q1:.2f}–{1e3 * q3:.2f})"


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


# -- memory -----------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_tensor_bytes(run: Callable[[], Any], resident: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds its graph.

    Storages of the ``resident`` tensors (parameters and buffers: frozen weights saved by ``linear`` are resident
    anyway) are excluded, and storages are counted once however many ops save them. ``run`` should return what
    keeps the graph alive (e.g. the loss); it is dropped after counting.
    """
    skip = {_storage_key(t) for t in resident}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        keep = run()
    total = sum(seen.values())  # the graph (and so every saved storage) is alive here: no address reuse
    del keep
    return total


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages on CPU while the mode is active, on top of a baseline.

    Every op's outputs are followed by storage (views share one); a storage counts from the op that created it
    until it is freed (a weak-reference finalizer). ``baseline`` tensors (parameters, gradients and optimizer
    state that exist before the step) are counted from the start. On CPU autograd runs backward in the calling
    thread, so backward ops are seen too (not on CUDA, where the caller should use ``max_memory_allocated``).
    Allocator caching and kernel workspaces are not counted; the result is what the tensors themselves hold.
    """

    def __init__(self, baseline: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        for t in baseline:
            if t is not None:
                st = t.untyped_storage()
                self._live[st.data_ptr()] = st.nbytes()
        self._baseline_keys = set(self._live)
        self.current = sum(self._live.values())
        self.baseline = self.current
        self.peak = self.current

    def _free(self, ptr: int) -> None:
        nbytes = self._live.pop(ptr, None)
        if nbytes is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in self._live:
                continue
            self._live[ptr] = st.nbytes()
            self.current += st.nbytes()
            weakref.finalize(st, self._free, ptr)
        self.peak = max(self.peak, self.current)
        return out


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (everything resident included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# -- profiler ---------------------------------------------------------------------------------------------------
OpKey = tuple[str, str]  # (op name, input shapes)


def profile_ops(step: Callable[[Any], Any], inputs: Sequence[Any], warm: int = 2) -> dict[OpKey, tuple[float, float]]:
    """Self CPU µs per step and calls per step of each (op, input shapes) over ``inputs`` (one step each)."""
    for x in inputs[:warm]:
        step(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for x in inputs:
            step(x)
    n = len(inputs)
    return {
        (e.key, str(e.input_shapes)): (e.self_cpu_time_total / n, e.count / n)
        for e in prof.key_averages(group_by_input_shape=True)
    }


def extra_ops_table(
    a: dict[OpKey, tuple[float, float]],
    b: dict[OpKey, tuple[float, float]],
    top: int = 20,
    total_label: str = "total extra op time",
) -> str:
    """The ops profile ``b`` runs that ``a`` does not (same op and input shapes, more calls per step).

    Ops both run equally often are the shared base model; their time differences between two profiler sessions
    are noise, so only the extra calls are attributed to ``b`` (at ``b``'s mean time per call).
    """
    extra: list[tuple[float, float, OpKey]] = []
    for key, (t_b, c_b) in b.items():
        c_a = a.get(key, (0.0, 0.0))[1]
        if c_b > c_a + 1e-9:
            extra.append((t_b * (c_b - c_a) / c_b, c_b - c_a, key))
    extra.sort(reverse=True)
    total = sum(t for t, _, _ in extra)
    lines = ["| op | input shapes | extra calls/step | extra µs/step |", "|---|---|---:|---:|"]
    for t, c, (name, shapes) in extra[:top]:
        short = shapes if len(shapes) <= 60 else shapes[:57] + "..."
        lines.append(f"| `{name}` | `{short}` | {c:g} | {t:.0f} |")
    rest = extra[top:]
    if rest:
        lines.append(f"| ({len(rest)} more) | | {sum(c for _, c, _ in rest):g} | {sum(t for t, _, _ in rest):.0f} |")
    lines.append(f"| **{total_label}** | | {sum(c for _, c, _ in extra):g} | **{total:.0f}** |")
    return "\n".join(lines)


# -- machine ----------------------------------------------------------------------------------------------------
def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown CPU").strip()
    hyper = fields.get("Hypervisor vendor", "").strip()
    return f"{model}{f' ({hyper} VM)' if hyper else ''}"


def machine_line(device: torch.device, malloc: bool = False) -> str:
    """One line: date (UTC), CPU model, nproc, torch/peft/transformers versions, threads, GPU if used, and whether
    `keep_freed_memory` applied."""
    import peft
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = ""
    if device.type == "cuda":
        gpu = f", GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return (
        f"{now}; {_lscpu_model()}, nproc {os.cpu_count()}; torch {torch.__version__}, peft {peft.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"{torch.get_num_threads()} torch threads{gpu}{'; malloc keeps freed memory (mallopt)' if malloc else ''}"
    )


def load_line() -> str:
    load = os.getloadavg()
    return f"load average (1/5/15 min) before: {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` gives one character per column (``l`` or ``r``; default: first l, rest r)."""
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def start_run(args: argparse.Namespace) -> tuple[torch.device, bool, float, str]:
    """The common start of a benchmark's ``main``: quiet library warnings, set the thread count, keep freed memory
    on CPU (see `keep_freed_memory`). Returns (device, whether memory is kept, start time, the machine-load line)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    malloc = keep_freed_memory() if args.device == "cpu" else False
    return torch.device(args.device), malloc, time.perf_counter(), load_line()
