"""Launch one dermsynth CLI command as N CPU processes talking over gloo (torch.distributed's env:// rendezvous)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(cmd: list[str], cache: Path, nprocs: int = 2, timeout: int = 900) -> None:
    """Run ``cmd`` once per rank; fail with the tail of every rank's output unless all exit 0."""
    port, procs = free_port(), []
    for rank in range(nprocs):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nprocs),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs), "OMP_NUM_THREADS": "1",
               "DERMSYNTH_CACHE": str(cache)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * nprocs, "\n\n".join(o[-3000:] for o in outputs)
