"""Two gloo processes on CPU: RigL masks identical on both ranks and equal to the
single-process run with the same global batch (so the gradient statistics were reduced)."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_rigl_matches_single_process(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"rank{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        # The single-process reference runs here while the two ranks run.
        spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
        worker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(worker)
        threads = torch.get_num_threads()
        worker.main(str(tmp_path / "single.pt"))
        torch.set_num_threads(threads)
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r0, r1, ref = (torch.load(tmp_path / f, weights_only=True) for f in ("rank0.pt", "rank1.pt", "single.pt"))
    assert r0["masks"].keys() == r1["masks"].keys() == ref["masks"].keys()
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
    # Same global batch, averaged gradients: the distributed masks match the 1-process ones
    # up to float-summation-order ties.
    agree = sum(int((r0["masks"][n] == ref["masks"][n]).sum()) for n in ref["masks"])
    total = sum(m.numel() for m in ref["masks"].values())
    assert agree / total > 0.995
    assert r0["losses"] == r1["losses"]
    assert max(abs(a - b) for a, b in zip(r0["losses"], ref["losses"])) < 1e-3
