"""The end-to-end demo, headed by the video-to-language transfer experiment (transfer.py): data,
teachers, distilled and baseline students, fine-tuning, grounding probe and report, at tiny size
on a CPU (`vidlankd demo --workdir runs/demo`); the ablation grid (`vidlankd ablate`, ablate.py)."""

from vidlankd_jax.demo.pipeline import SIZES, run_demo

__all__ = ["SIZES", "run_demo"]
