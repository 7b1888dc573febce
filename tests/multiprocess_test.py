"""Two processes on 127.0.0.1 with jax.distributed train the smoke config.

Each process has 2 CPU devices (4 in all). Both must finish, report the same
final metrics, and the shared workdir must hold the final checkpoint.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_agree_and_checkpoint(tmp_path):
  port = free_port()
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/smoke.py",
       "--workdir", str(workdir), "--config.num_epochs=1", "--multiprocess",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  finals = []
  for out in outputs:
    line = [l for l in out.splitlines() if l.startswith("final metrics: ")]
    assert line, out
    finals.append(json.loads(line[-1][len("final metrics: "):]))
  assert finals[0] == finals[1]
  assert "val/clean_accuracy" in finals[0]
  assert (workdir / "checkpoints" / "8").is_dir()
  assert (workdir / "metrics.jsonl").exists()  # written by process 0 only
