import gzip
import json

import torch
from torch.profiler import record_function

from longcat_ray.profiling import StepProfiler, busy_intervals, idle_by_phase


def kernel(ts, dur):
    return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur}


def phase(name, ts, dur):
    return {"ph": "X", "cat": "user_annotation", "name": f"lcr:{name}", "ts": ts, "dur": dur}


def test_device_idle_is_split_by_what_the_host_was_doing():
    # device: busy 0-10 and 5-20 (overlapping), idle 20-30, busy 30-40, idle 40-60, busy 60-70
    events = [kernel(0, 10), kernel(5, 15), kernel(30, 10), kernel(60, 10),
              phase("forward", 0, 25), phase("step", 45, 10), {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 20, "dur": 50},
              {**phase("forward", 0, 70), "cat": "gpu_user_annotation"}]  # the device-side copy of a phase: not the host
    assert busy_intervals(events) == [(0, 20), (30, 40), (60, 70)]
    # 20-25 under forward, 25-30 other; 40-45 other, 45-55 step, 55-60 other
    assert idle_by_phase(events) == {"forward": 5, "other": 15, "step": 10}
    assert idle_by_phase([phase("forward", 0, 9)]) == {}  # no device activity: nothing idle to explain


def test_step_profiler_writes_the_tables_and_the_timeline(tmp_path):
    profiler = StepProfiler((2, 3), torch.device("cpu"), str(tmp_path))
    x = torch.randn(64, 64)
    for done in range(5):
        profiler.at_step(done)
        with record_function("lcr:forward"):
            x = (x @ x).tanh()
    text = (tmp_path / "profile-rank0.txt").read_text()
    assert text.startswith("profiled 2 optimizer steps") and "aten::mm" in text
    assert "no device activity" in text.splitlines()[0]  # a CPU run has no device timeline to split
    with gzip.open(tmp_path / "trace-rank0.json.gz") as handle:
        names = [e.get("name") for e in json.load(handle)["traceEvents"]]
    assert names.count("lcr:forward") == 2  # the two profiled steps' phases, on the timeline
    assert not (tmp_path / "trace-rank0.json").exists()
