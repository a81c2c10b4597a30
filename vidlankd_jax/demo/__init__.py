"""The end-to-end demo: data, teacher, distilled and baseline students, fine-tuning, grounding
probe and report, at tiny size on a CPU (`vidlankd demo --workdir runs/demo`)."""

from vidlankd_jax.demo.pipeline import SIZES, run_demo

__all__ = ["SIZES", "run_demo"]
