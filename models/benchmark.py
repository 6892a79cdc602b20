"""Timing and memory of pruning methods, measured side by side (what ``vidprune bench`` runs).

Pure PyTorch. Every contender is a :class:`StreamRunner` (the model with a method) stepping the
same frames. Wall-clock time on a shared machine drifts, so contenders are never timed in
separate runs: within one repetition, frame ``t`` goes through every contender before frame
``t + 1`` goes through any, the contenders' order rotates from one repetition to the next, and
speedups are ratios taken per repetition (dense time over method time, the same frames) whose
median is reported. A warm-up pass runs first (allocator, kernels, caches).

Every contender starts its streams fresh in every repetition, so its average includes the dense
first frame and, for rollout, the dense refresh frames, as the ledger's figures do; the steady
state (frames after the first) is reported beside it.

Memory is measured in a separate, untimed pass per contender: the bytes its per-stream state
holds (references, buffers, caches), and the peak memory of a run over a few frames above what
the process held before it (the resident-set high-water mark on Linux CPUs, reset through
``/proc/self/clear_refs``; the CUDA allocator's peak on GPUs).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .layers import release_scratch
from .methods.gates import release_spare_state
from .runner import RunnerState, StepOutput, StreamRunner


@dataclass
class Contender:
    """One model + method combination to time; ``setting`` names its parameters."""

    method: str
    setting: str
    runner: StreamRunner


@dataclass
class Measurement:
    """What one contender did over every repetition (seconds per step, per frame)."""

    contender: Contender
    step_s: list[list[float]] = field(default_factory=list)      # [repetition][frame]
    backbone_s: list[list[float]] = field(default_factory=list)  # method.forward only
    cpu_s: list[list[float]] = field(default_factory=list)       # process CPU time per step
    gmacs: list[float] = field(default_factory=list)        # per frame, mean over streams
    gmacs_dense: list[float] = field(default_factory=list)
    gmacs_padding: list[float] = field(default_factory=list)  # ragged batches' padding rows
    tokens: list[float] = field(default_factory=list)
    tokens_dense: list[float] = field(default_factory=list)
    state_bytes: int = 0                 # largest state over the frames, all streams
    peak_bytes: int | None = None        # peak memory above the baseline, all streams
    peak_kind: str = "not measured"
    outputs: list[list[StepOutput]] = field(default_factory=list)  # last repetition


class _TimedMethod:
    """A method whose ``forward`` (the backbone) is timed; everything else is delegated."""

    def __init__(self, method: Any, device: torch.device):
        self._method = method
        self._device = device
        self.last_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        synchronize(self._device)
        start = time.perf_counter()
        out = self._method.forward(*args, **kwargs)
        synchronize(self._device)
        self.last_s += time.perf_counter() - start
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runner(model: torch.nn.Module, method: Any, **kwargs: Any) -> StreamRunner:
    """A runner whose method's backbone time is recorded (``runner.method.last_s``)."""
    runner = StreamRunner(model, method, **kwargs)
    runner.method = _TimedMethod(method, runner.device)
    return runner


def _step(c: Contender, frames: Sequence[np.ndarray], state: RunnerState
          ) -> tuple[list[StepOutput], float, float, float]:
    timed = c.runner.method
    timed.last_s = 0.0
    synchronize(c.runner.device)
    cpu = time.process_time()
    start = time.perf_counter()
    outs = c.runner.step(frames, state)
    synchronize(c.runner.device)
    wall = time.perf_counter() - start
    return outs, wall, timed.last_s, time.process_time() - cpu


def run_side_by_side(contenders: Sequence[Contender], streams: Sequence[Sequence[np.ndarray]],
                     repeats: int = 3, warmup: int = 2,
                     progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Step every contender over the same ``streams`` (one frame list per stream, equal
    lengths), interleaved frame by frame, ``repeats`` times after a warm-up of ``warmup``
    frames each. ``progress`` gets a line after the warm-up and after each frame (every
    contender stepped it) of each repetition."""
    n_frames = len(streams[0])
    if any(len(s) != n_frames for s in streams):
        raise ValueError("every stream needs the same number of frames")
    for c in contenders:
        if not isinstance(c.runner.method, _TimedMethod):
            raise TypeError("contenders need a runner from timed_runner()")
    batch = len(streams)
    frames_at = [[s[t] for s in streams] for t in range(n_frames)]
    warm = [c.runner.new_state(batch) for c in contenders]
    for c, state in zip(contenders, warm):
        for t in range(min(warmup, n_frames)):
            _step(c, frames_at[t], state)
    # ended together, as a finished segment's states are: what they give back (eventful's
    # recycled state memory) is there for every contender's first repetition, as it is for
    # the next repetitions
    del warm, state
    out = [Measurement(c) for c in contenders]
    clock = time.perf_counter()
    if progress:
        progress("warm-up done")
    for rep in range(repeats):
        order = list(range(len(contenders)))
        order = order[rep % len(order):] + order[:rep % len(order)]
        states = [c.runner.new_state(batch) for c in contenders]
        for m in out:
            m.step_s.append([])
            m.backbone_s.append([])
            m.cpu_s.append([])
        last = rep == repeats - 1
        if last:
            for m in out:
                m.outputs = []
        for t in range(n_frames):
            for i in order:
                m = out[i]
                outs, wall, backbone, cpu = _step(m.contender, frames_at[t], states[i])
                m.step_s[-1].append(wall)
                m.backbone_s[-1].append(backbone)
                m.cpu_s[-1].append(cpu)
                if rep == 0:
                    _record_work(m, outs, states[i])
                if last:
                    m.outputs.append(outs)
            if progress:
                progress(f"repetition {rep + 1}/{repeats}, frame {t + 1}/{n_frames} "
                         f"({time.perf_counter() - clock:.0f} s)")
    return out


def _record_work(m: Measurement, outs: list[StepOutput], state: RunnerState) -> None:
    n = len(outs)
    m.gmacs.append(sum(o.gmacs_run for o in outs) / n)
    m.gmacs_dense.append(sum(o.gmacs_dense for o in outs) / n)
    m.gmacs_padding.append(sum(o.gmacs_padding for o in outs) / n)
    m.tokens.append(sum(o.tokens_run for o in outs) / n)
    m.tokens_dense.append(sum(o.tokens_dense for o in outs) / n)
    m.state_bytes = max(m.state_bytes, tensor_bytes(state.method))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (a method state: its
    dataclasses, lists, tuples and dicts)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                return
            storage = x.untyped_storage()
            key = (str(x.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
        elif hasattr(x, "__dict__") and not isinstance(x, (torch.nn.Module, type)):
            for y in vars(x).values():
                visit(y)

    visit(obj)
    return total


# --- memory --------------------------------------------------------------------------------

def measure_memory(m: Measurement, streams: Sequence[Sequence[np.ndarray]],
                   frames: int = 4) -> None:
    """Peak memory of ``m``'s contender over its first ``frames`` frames (fresh state), above
    what the process held before; sets ``m.peak_bytes`` and ``m.peak_kind``."""
    runner = m.contender.runner
    device = runner.device
    batch = len(streams)
    frames = min(frames, len(streams[0]))
    gc.collect()
    release_scratch()
    release_spare_state()  # a state's memory counts in full, as in a fresh process
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _trim_heap()
        base = _rss_bytes()
        if base is None or not _reset_peak_rss():
            m.peak_bytes, m.peak_kind = None, "not measured"
            return
    state = runner.new_state(batch)
    for t in range(frames):
        runner.step([s[t] for s in streams], state)
        m.state_bytes = max(m.state_bytes, tensor_bytes(state.method))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        m.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        m.peak_kind = "cuda peak allocated"
    else:
        m.peak_bytes = max(0, _peak_rss_bytes() - base)
        m.peak_kind = "peak RSS"
    del state
    gc.collect()
    release_scratch()
    release_spare_state()


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int | None:
    return _status_kb("VmRSS")


def _peak_rss_bytes() -> int:
    return _status_kb("VmHWM") or 0


def _reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap memory back to the system, so the baseline is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- summaries -----------------------------------------------------------------------------

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(measurements: Sequence[Measurement], dense: Measurement) -> list[dict[str, Any]]:
    """One row per contender: work per frame and stream, and savings (all frames, and the
    frames after the first); latency of a step (frame t of every stream; backbone only, and
    ``frame_``: the whole step with preprocessing and head), the median over repetitions of
    the mean over frames; speedup, the median over repetitions of dense's mean step time
    over this contender's on the same frames."""
    rows = []
    for m in measurements:
        c = m.contender
        batch = len(m.outputs[0]) if m.outputs else 1
        dense_gmacs = _mean(m.gmacs_dense)
        gmacs = _mean(m.gmacs)
        gmacs_steady = _mean(m.gmacs[1:]) if len(m.gmacs) > 1 else gmacs
        row: dict[str, Any] = {
            "method": c.method,
            "setting": c.setting,
            "device": str(c.runner.device),
            "streams": batch,
            "gmacs_per_frame": gmacs,
            "savings": 1 - gmacs / dense_gmacs if dense_gmacs else 0.0,
            "gmacs_reduction": dense_gmacs / gmacs if gmacs else float("nan"),
            "gmacs_steady": gmacs_steady,
            "savings_steady": 1 - gmacs_steady / dense_gmacs if dense_gmacs else 0.0,
            "gmacs_dense": dense_gmacs,
            # run on the padding rows of ragged streams batched together, outside
            # gmacs_per_frame (the method's own work) but in the timed step
            "gmacs_padding_per_frame": _mean(m.gmacs_padding),
            "token_fraction": _mean(m.tokens) / _mean(m.tokens_dense) if _mean(m.tokens_dense)
            else float("nan"),
        }
        for name, series, ref in (("", m.backbone_s, dense.backbone_s),
                                  ("frame_", m.step_s, dense.step_s)):
            per_rep = [_mean(r) for r in series]
            steady = [_mean(r[1:]) for r in series]
            ratios = [_mean(a) / b for a, b in zip(ref, per_rep)]
            ratios_steady = [_mean(a[1:]) / b for a, b in zip(ref, steady)]
            row[f"{name}latency_ms"] = 1e3 * statistics.median(per_rep)
            row[f"{name}speedup"] = statistics.median(ratios)
            row[f"{name}latency_steady_ms"] = 1e3 * statistics.median(steady)
            row[f"{name}speedup_steady"] = statistics.median(ratios_steady)
            if not name:
                row["speedup_min"], row["speedup_max"] = min(ratios), max(ratios)
                row["ms_per_frame"] = row["latency_ms"] / batch
        row["cpu_ms"] = 1e3 * statistics.median([_mean(r) for r in m.cpu_s])
        # per frame, the median over repetitions (shows the dense first and refresh frames)
        row["backbone_ms_by_frame"] = [1e3 * statistics.median(f) for f in zip(*m.backbone_s)]
        row["state_mb_per_stream"] = m.state_bytes / batch / 2**20
        row["peak_mb_per_stream"] = (m.peak_bytes / batch / 2**20
                                     if m.peak_bytes is not None else float("nan"))
        row["peak_kind"] = m.peak_kind
        row["frames"] = len(m.gmacs)
        row["repeats"] = len(m.step_s)
        rows.append(row)
    return rows
