"""The same loop under a 2-process launch (gloo on CPU): data sharded, gradients averaged right."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loop import random_rows, train_weights

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_grad_accum(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port: a fixed one clashes with any other run on the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(WORKER), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = torch.load(out / "weights.pt", weights_only=True)
    # Rank r takes global micro-batches r, r+2, ...: one 2-process step sees the rows a single process
    # sees in two accumulated micro-batches, and both normalise by the step's total token count.
    single = train_weights(tmp_path / "single", batch_size=4, grad_accum=2, rows=random_rows(48))
    for name, value in single.items():
        assert torch.allclose(value, distributed[name], atol=2e-6), name
