"""Runs of `python -m vidlankd_jax.main` as real processes, for the operations tests.

Used two ways:
  * imported by the tests: `launch`/`run` start one process, or several joined by
    `jax.distributed` on 127.0.0.1 (gloo CPU collectives), each with its own number of CPU
    devices; `read_metrics`/`final_params` read what a run left in its workdir.
  * as a script, `python tests/support/multihost_worker.py [options] -- <vidlankd_jax.main flags>`:
    runs main with a fault or a data layout that a plain command cannot produce:
      --stall_save_at=N   the asynchronous save of step N writes its files, then never commits
                          (the process is meant to be SIGKILLed there); a marker file
                          `<workdir>/stalled_save` says when it is there.
      --as_hosts=H        one process reads the global batch as H hosts would (each host's
                          shard, in host order): the single-process reference of an H-host run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING_KEYS = ("train/steps_per_second", "train/examples_per_second", "train/minutes_left")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int, cache_dir: str | None = None) -> dict:
  """A CPU-only environment with `devices` emulated devices (and a shared compile cache)."""
  out = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="2",
      CUDA_VISIBLE_DEVICES="",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      PYTHONPATH=REPO,
  )
  if cache_dir:
    out.update(
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return out


def main_command(
    config: str, workdir: str, overrides: dict, worker_options: tuple = ()
) -> list[str]:
  flags = [f"--config={config}", f"--workdir={workdir}"]
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  if worker_options:
    return [sys.executable, os.path.abspath(__file__), *worker_options, "--", *flags]
  return [sys.executable, "-m", "vidlankd_jax.main", *flags]


_launched: list[subprocess.Popen] = []  # every process `launch` started, until killed or reaped


def kill_leftovers() -> None:
  """Kills the launched processes still running (a test that failed while waiting for them)."""
  for p in _launched:
    if p.poll() is None:
      p.kill()
      p.wait()
  _launched.clear()


def launch(
    config: str,
    workdir: str,
    overrides: dict,
    *,
    processes: int = 1,
    devices: int = 8,
    cache_dir: str | None = None,
    worker_options: tuple = (),
) -> list[subprocess.Popen]:
  """Starts the run's processes (output to `<workdir>/process_<i>.log`); returns them."""
  os.makedirs(workdir, exist_ok=True)
  command = main_command(config, workdir, overrides, worker_options)
  port = free_port()
  procs = []
  for i in range(processes):
    args = list(command)
    if processes > 1:
      args += [
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={processes}",
          f"--process_id={i}",
      ]
    log = open(os.path.join(workdir, f"process_{i}.log"), "w")
    procs.append(
        subprocess.Popen(
            args, cwd=REPO, env=env(devices, cache_dir), stdout=log, stderr=subprocess.STDOUT
        )
    )
  _launched.extend(procs)
  return procs


def wait(procs: list[subprocess.Popen], workdir: str, timeout: float = 600) -> list[str]:
  """Waits for every process; returns their logs. A process still alive at `timeout` is killed."""
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      p.wait()
  return [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(len(procs))]


def run(config: str, workdir: str, overrides: dict, **kwargs) -> list[str]:
  """Runs to the end; every process must exit 0. Returns the logs."""
  procs = launch(config, workdir, overrides, **kwargs)
  logs = wait(procs, workdir)
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, f"processes (index, exit code) {failed} failed:\n" + "\n".join(
      log[-3000:] for log in logs
  )
  return logs


def read_metrics(workdir: str, *, timing: bool = False) -> list[dict]:
  """The JSON lines of `<workdir>/metrics.jsonl` (without wall-clock figures unless `timing`)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.endswith("\n")]
  return [{k: v for k, v in m.items() if timing or k not in TIMING_KEYS} for m in lines]


def wait_for_step(
    workdir: str, step: int, procs: list[subprocess.Popen], timeout: float = 600
) -> None:
  """Blocks until `metrics.jsonl` has a line for `step` or later (fails if the run ended)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(m["step"] >= step for m in read_metrics(workdir)):
      return
    if all(p.poll() is not None for p in procs):
      raise AssertionError(f"the run in {workdir} ended before step {step}")
    time.sleep(0.02)
  raise AssertionError(f"the run in {workdir} did not reach step {step} in {timeout} s")


def final_params(workdir: str) -> dict:
  """The newest checkpoint's params as host numpy arrays."""
  from vidlankd_jax import checkpoint as ckpt_lib

  return ckpt_lib.restore_params_numpy(os.path.join(workdir, "checkpoints"))


def checkpoint_steps(workdir: str) -> tuple[list[int], list[str]]:
  """(finished steps, unfinished save folders) under `<workdir>/checkpoints`."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return (
      sorted(int(n) for n in names if n.isdigit()),
      sorted(n for n in names if ".orbax-checkpoint-tmp" in n),
  )


def write_text_corpus(root: str) -> str:
  """Student TFRecords (train/validation) of real English text (gensim's Lee news corpus)."""
  import gensim.test.utils as gensim_data
  from vidlankd_jax.data import text as text_lib
  from vidlankd_jax.data import vocab as vocab_lib

  with open(gensim_data.datapath("lee_background.cor"), encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  cut = int(0.85 * len(lines))
  vocab = vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())
  for split, part in (("train", lines[:cut]), ("validation", lines[cut:])):
    raw = os.path.join(root, f"{split}.txt")
    with open(raw, "w", encoding="utf-8") as f:
      f.write("".join(part))
    text_lib.convert_text(
        [raw],
        os.path.join(root, "text", "wiki103"),
        vocab,
        prefix="wiki103",
        split=split,
        num_shards=1,
        fmt="lines",
        log=lambda *_: None,
    )
  return os.path.join(root, "text")


# ---------------------------------------------------------------------------------------------
# Script mode.


def stall_save_at(step: int, workdir: str) -> None:
  """Makes the commit (the final rename) of step `step`'s save wait forever."""
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def stalled(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == str(step):
      open(os.path.join(workdir, "stalled_save"), "w").close()
      while True:
        time.sleep(1)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = stalled


def read_as_hosts(num_hosts: int) -> None:
  """`pipeline.host_batches` yields the global batch an H-host run reads: each host's shard of
  it (that host's input pipeline), concatenated in host order."""
  import numpy as np
  from vidlankd_jax.data import pipeline
  from vidlankd_jax.data import tasks

  def host_batches(
      spec, mesh, split, *, global_batch_size, seed, start_step=0, repeat=True, shuffle=True
  ):
    shards = [
        tasks.make_dataset(
            spec,
            split,
            batch_size=global_batch_size // num_hosts,
            shard_index=i,
            num_shards=num_hosts,
            seed=seed,
            start_step=start_step,
            repeat=repeat,
            shuffle=shuffle,
        ).as_numpy_iterator()
        for i in range(num_hosts)
    ]
    for parts in zip(*shards):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  pipeline.host_batches = host_batches


def script_main() -> None:
  split = sys.argv.index("--")
  options = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:split])
  sys.argv = [sys.argv[0]] + sys.argv[split + 1 :]
  sys.path.insert(0, REPO)
  workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
  if "stall_save_at" in options:
    stall_save_at(int(options["stall_save_at"]), workdir)
  if "as_hosts" in options:
    read_as_hosts(int(options["as_hosts"]))
  from absl import app
  from vidlankd_jax import main

  app.run(main.main)


if __name__ == "__main__":
  script_main()
