"""bench/gpu.py runs on the CPU (--quick): every requested row has positive training and sampling rates."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_bench_quick_on_cpu(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu", "--quick", "--nets", "dit-mnist",
           "--variants", "fp32", "bf16+channels_last", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads((tmp_path / "gpu-quick.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["fp32", "bf16+channels_last"]
    assert all(r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0 for r in report["rows"])
    assert report["ddp"]["world"] == 2 and report["ddp"]["backend"] == "gloo" and report["ddp"]["images_per_s"] > 0
    assert "| dit-mnist | fp32 |" in (tmp_path / "gpu-quick.md").read_text()
