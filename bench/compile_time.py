"""Compile time of the distillation step against the depth, scanned and unrolled layers.

The step is the training loop's own (NST, the teacher's forward inside), at the base width
(768 hidden, 12 heads, FFN 3072) with student and teacher of `--layers` layers each; every
figure is the time to lower and compile it (`jit(...).lower(...).compile()`), in a fresh
process per configuration so no cache helps.

    python bench/compile_time.py                       # layers 2, 6, 12; scanned and unrolled
    python bench/compile_time.py --layers 2,12 --forms scanned

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def compile_seconds(layers: int, scanned: bool, batch: int) -> float:
  """Lowers and compiles the base-width distillation step of `layers` layers (this process)."""
  from vidlankd_jax import configlib, sharding

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from distill_step import random_batch, setup_and_step

  config = configlib.load("distill", "size=base,objectives=nst")
  config.dtype = "float32"
  config.train.batch_size = batch
  for model in (config.model, config.teacher.model):
    model.num_layers = layers
    model.scan_layers = scanned
  mesh = sharding.single_device_mesh()
  setup, step = setup_and_step(config, mesh)
  batch = sharding.global_batch(random_batch(config), mesh)
  start = time.perf_counter()
  step.lower(setup.state, batch).compile()
  return time.perf_counter() - start


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", default="2,6,12")
  p.add_argument("--forms", default="scanned,unrolled")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: "layers,form"
  args = p.parse_args(argv)
  if args.one:
    layers, form = args.one.split(",")
    print(json.dumps({"seconds": compile_seconds(int(layers), form == "scanned", args.batch)}))
    return {}
  results = {}
  for form in args.forms.split(","):
    for layers in map(int, args.layers.split(",")):
      out = subprocess.run(
          [sys.executable, __file__, f"--one={layers},{form}", f"--batch={args.batch}"],
          capture_output=True,
          text=True,
          check=True,
      )
      seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
      results[f"{form}/{layers}"] = seconds
      print(f"{form:>9} {layers:3d} layers: {seconds:6.1f} s to compile", flush=True)
  for form in args.forms.split(","):
    depths = sorted(int(k.split("/")[1]) for k in results if k.startswith(form))
    ratio = results[f"{form}/{depths[-1]}"] / results[f"{form}/{depths[0]}"]
    results[f"{form}/ratio_{depths[-1]}_to_{depths[0]}"] = ratio
    print(f"{form:>9}: {depths[-1]} layers take {ratio:.2f}x the time of {depths[0]}", flush=True)
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  main()
