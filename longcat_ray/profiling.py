"""Where a training step's time goes: torch.profiler over chosen optimizer steps (TrainConfig.profile_steps).

Writes, under the run's logs/: profile-rank0.txt (the summary tables, by device time and by host time, under a
header with wall time, device busy time and the GPU's idle time split by what the host was doing then) and
trace-rank0.json.gz (the timeline, for chrome://tracing or Perfetto). The training loop names its phases with
`record_function("lcr:<phase>")`; time outside them is `other` (data, logging).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from typing import Any

import torch

PHASE_PREFIX = "lcr:"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_intervals(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Chrome-trace events -> the merged [start, end] µs intervals in which any device activity ran."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_by_phase(events: list[dict[str, Any]]) -> dict[str, float]:
    """-> µs the device sat idle (between its first and last activity) while the host was in each phase.

    A phase is a `lcr:<name>` annotation on the host (the profiler also draws it on the device's timeline: not
    that one); idle time that no annotation covers is `other`. Idle under a phase means the device waited for the host's work there."""
    busy = busy_intervals(events)
    phases = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"][len(PHASE_PREFIX):]) for e in events
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PHASE_PREFIX))
    idle: dict[str, float] = {}
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        covered = 0.0
        for start, end, name in phases:
            overlap = min(end, gap_end) - max(start, gap_start)
            if overlap > 0:
                idle[name] = idle.get(name, 0.0) + overlap
                covered += overlap
        idle["other"] = idle.get("other", 0.0) + max(0.0, gap_end - gap_start - covered)
    return idle


class StepProfiler:
    """torch.profiler over optimizer steps [first, last] of rank 0 (see the module's doc)."""

    def __init__(self, steps: tuple[int, int] | None, device: torch.device, directory: str | None):
        self.steps, self.device, self.directory, self.active = steps, device, directory, None

    def at_step(self, done: int) -> None:
        """Called before each micro-batch with the optimizer steps done so far."""
        if not self.steps or not self.directory:
            return
        first, last = self.steps
        if self.active is None and done == first - 1:
            self.start()
        elif self.active is not None and done == last:
            self.finish(last - first + 1)

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.active, self.opened = profile(activities=activities), time.perf_counter()
        self.active.__enter__()

    def finish(self, steps: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.opened
        self.active.__exit__(None, None, None)
        os.makedirs(self.directory, exist_ok=True)
        trace = os.path.join(self.directory, "trace-rank0.json")
        self.active.export_chrome_trace(trace)  # torch writes a file only; read it once, keep it compressed
        with open(trace, "rb") as raw:
            text = raw.read()
        os.remove(trace)
        with gzip.open(trace + ".gz", "wb") as packed:
            packed.write(text)
        events = json.loads(text)["traceEvents"]
        header = self.header(steps, wall, events)
        tables = [self.active.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
                  for key in ("self_device_time_total", "self_cpu_time_total")]
        with open(os.path.join(self.directory, "profile-rank0.txt"), "w") as handle:
            handle.write(header + "\n\n" + "\n\n".join(tables))
        print(header.strip(), flush=True)
        self.steps, self.active = None, None

    @staticmethod
    def header(steps: int, wall: float, events: list[dict[str, Any]]) -> str:
        busy = sum(end - start for start, end in busy_intervals(events)) / 1e3 / steps
        idle = ", ".join(f"{name} {us / 1e3 / steps:.1f}" for name, us in sorted(idle_by_phase(events).items()))
        return (f"profiled {steps} optimizer steps (the profiler slows the host): wall {wall / steps * 1e3:.1f} ms "
                f"per step, device busy {busy:.1f} ms per step (any kernel or copy running), device idle by host "
                f"phase (ms per step): {idle or 'no device activity'}\n")
