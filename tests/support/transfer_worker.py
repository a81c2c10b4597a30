"""Runs the transfer experiment (`vidlankd_jax/demo/transfer.py`) in a process of its own, on one
device as `vidlankd demo` runs it, and writes its results to `<out_dir>/results.json`:

  python tests/support/transfer_worker.py WORLD_DIR TEACHER_DIR SHUFFLED_TEACHER_DIR OUT_DIR NUM_SEEDS
"""

import json
import os
import sys

from vidlankd_jax.demo import stages
from vidlankd_jax.demo import transfer


def main(world_dir, teacher_dir, shuffled_teacher_dir, out_dir, num_seeds):
  results = transfer.run_experiment(
      world_dir,
      {"video": teacher_dir, "video_shuffled": shuffled_teacher_dir},
      out_dir,
      steps=transfer.STUDENT_STEPS,
      num_seeds=int(num_seeds),
      objectives=("nst",),
      seed=0,
  )
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(stages.json_ready(results), f)


if __name__ == "__main__":
  main(*sys.argv[1:])
