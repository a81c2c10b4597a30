"""The registry of training stages: config.stage -> the module that implements it.

Each module offers the stage contract of `loop` (`init`, `example_batch`, `build`) and
`train_and_evaluate(config, workdir)`. A new stage is one module and one line here. Modules load
only when asked for, so reading the names costs nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "teacher": "vidlankd_jax.train.teacher",
    "distill": "vidlankd_jax.train.distill",
    "finetune": "vidlankd_jax.train.finetune",
}


def get(name: str) -> ModuleType:
  """The module of stage `name` (a KeyError naming the stages for another name)."""
  if name not in STAGES:
    raise KeyError(f"no stage {name!r}; the stages are {sorted(STAGES)}")
  return importlib.import_module(STAGES[name])
