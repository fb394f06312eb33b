"""The ``memory`` metric of metrics.jsonl (model/training/metrics.py): a per-step peak, not the process's."""

import subprocess
import sys
import textwrap

import pytest

# A fresh process: in the pytest process an earlier test may have changed malloc's settings (mallopt), and
# then freed memory would stay resident and the measurement would say nothing.
PROBE = textwrap.dedent("""
    import numpy as np, torch
    from model.training.metrics import peak_memory_mb, reset_peak_memory
    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)          # 400 MB touched, then freed (munmap: RSS falls back)
    del big
    before = peak_memory_mb(cpu)
    ok = reset_peak_memory(cpu)              # a new step starts
    small = np.ones(40 * 2**20 // 8)         # this step peaks 40 MB above its start
    after = peak_memory_mb(cpu)
    print(before, after, ok)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_cpu_memory_metric_is_the_peak_of_the_step_not_of_the_process_lifetime():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, after, ok = out.stdout.split()
    before, after = float(before), float(after)
    assert before > 400  # the earlier 400 MB peak is in the lifetime peak ...
    assert after < before - 300, (before, after)  # ... but not in the peak of the step that followed
    assert after > 40  # and the step's own 40 MB is
    assert ok == "True"


def test_when_the_peak_cannot_be_reset_the_metric_says_it_is_the_lifetime_peak(monkeypatch, caplog):
    import builtins

    import torch

    from model.training import metrics

    real_open = builtins.open

    def no_clear_refs(path, *a, **k):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_clear_refs)
    monkeypatch.setattr(metrics, "_cpu_peak_resettable", None)
    with caplog.at_level("WARNING"):
        assert metrics.reset_peak_memory(torch.device("cpu")) is False
        assert metrics.reset_peak_memory(torch.device("cpu")) is False
    warned = [r.getMessage() for r in caplog.records if "clear_refs" in r.getMessage()]
    assert len(warned) == 1 and "peak since it started" in warned[0]
    assert metrics.peak_memory_mb(torch.device("cpu")) > 0
