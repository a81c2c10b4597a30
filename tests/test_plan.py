"""`vidlankd plan`: stages compiled for TPU topologies on the CPU (libtpu, deviceless).

libtpu serves one process at a time: every test that compiles for a TPU lives in this module
(pytest's `--dist loadfile` keeps a module on one worker).
"""

import functools
import json

import ml_collections
import pytest

from vidlankd_jax import cli
from vidlankd_jax import configlib
from vidlankd_jax import plan
from vidlankd_jax import sharding

pytest.importorskip("libtpu")
pytestmark = pytest.mark.slow  # compiles for TPU topologies: 10-30 s each, about 2 minutes


def mesh_cfg(data, fsdp=1, tensor=1, num_slices=1):
  return ml_collections.ConfigDict(
      {"data": data, "fsdp": fsdp, "tensor": tensor, "num_slices": num_slices}
  )


def test_a_mesh_off_the_torus_is_one_line_naming_the_axis():
  devices = plan.topology_devices("v5e:4x4", 1)
  with pytest.raises(ValueError) as error:
    sharding.make_mesh(mesh_cfg(8, 2), devices)
  message = str(error.value)
  assert "\n" not in message and "config.mesh.data" in message and "4x4" in message


def test_the_hybrid_mesh_puts_the_slices_on_the_data_axis():
  devices = plan.topology_devices("v5e:2x2", 2)
  mesh = sharding.make_mesh(mesh_cfg(4, 2, num_slices=2), devices)
  for (d, f, t), device in zip(
      ((d, f, t) for d in range(4) for f in range(2) for t in range(1)), mesh.devices.flat
  ):
    assert device.slice_index == d // 2, (d, f, t)


def test_the_tiny_teacher_compiles_and_fits_a_v5e_2x2():
  config = configlib.load("teacher", "size=tiny")
  result = plan.plan(config, "v5e:2x2", correct_layers=False)
  assert set(plan.JSON_KEYS) <= set(result)
  hbm = result["hbm_bytes"]
  assert all(hbm[k] > 0 for k in ("params_and_opt", "batch", "temp", "code"))
  assert hbm["total"] < result["hbm_capacity_bytes"] and result["fits"]
  assert result["chips"] == 4 and result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert result["collectives"]["all-reduce"]["count"] > 0
  assert result["estimated_step_s"] > 0


@pytest.mark.parametrize("stage", ["distill", "finetune"])
def test_two_slices_cross_the_dcn_only_between_slices(stage):
  """Data parallel over two v5e 2x2 slices: the ICI collectives stay inside a slice and the
  gradient exchange between the slices goes over the DCN."""
  config = configlib.load(stage, "size=tiny")
  result = plan.plan(config, "v5e:2x2", num_slices=2, correct_layers=False)
  assert result["chips"] == 8 and result["fits"] and result["mesh"]["data"] == 8
  assert sum(c["dcn_bytes_per_chip"] for c in result["collectives"].values()) > 0
  program = plan.hlo.parse(result["hlo_text"])
  for c in plan.hlo.collectives(program, 8):
    assert all(max(group) < 4 for group in c.groups), c.name  # slice-local device ids


@functools.cache
def tiny_teacher_plan(data: int, fsdp: int, batch: int) -> dict:
  """The tiny teacher's plan on v5e:2x2 (as compiled: the matmul count needs no unrolled
  compiles), once per mesh and batch for the module."""
  config = configlib.load("teacher", "size=tiny")
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.train.batch_size = batch
  return plan.plan(config, "v5e:2x2", correct_layers=False)


@pytest.mark.parametrize("data, fsdp", [(4, 1), (1, 4)])
def test_no_chip_repeats_another_s_matmuls_on_a_data_or_fsdp_mesh(data, fsdp):
  result = tiny_teacher_plan(data, fsdp, 16)
  assert result["mesh"] == {"data": data, "fsdp": fsdp, "tensor": 1}
  assert result["replication"] == pytest.approx(1.0, rel=0.1)
  assert result["matmul_flops_per_chip"] * 4 == pytest.approx(result["analytic_flops"], rel=0.1)


def test_hbm_is_below_the_chip_s_and_grows_with_the_per_chip_batch():
  """4 and 128 sequences per chip (at a few per chip the tiny teacher's temporaries are its
  vocabulary-sized gradients, whatever the batch)."""
  small, large = tiny_teacher_plan(4, 1, 16), tiny_teacher_plan(4, 1, 512)
  for result in (small, large):
    hbm = result["hbm_bytes"]
    assert all(hbm[k] > 0 for k in ("params_and_opt", "batch", "temp", "code", "total"))
    assert hbm["total"] < result["hbm_capacity_bytes"]
  assert large["hbm_bytes"]["batch"] == 32 * small["hbm_bytes"]["batch"]
  assert large["hbm_bytes"]["temp"] > small["hbm_bytes"]["temp"]
  assert large["hbm_bytes"]["total"] > small["hbm_bytes"]["total"]
  assert large["hbm_bytes"]["params_and_opt"] == small["hbm_bytes"]["params_and_opt"]


def test_the_command_prints_the_plan_and_writes_the_json(tmp_path, capsys):
  """`vidlankd plan` as tpu_launch.sh's preflight runs it (an override included)."""
  path = tmp_path / "plan.json"
  argv = [
      "plan",
      "--config=configs/finetune.py:size=tiny",
      "--config.mesh.fsdp=2",
      "--topology=v5e:2x2",
      "--as_compiled",
      f"--json={path}",
  ]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "mesh data 2 x fsdp 2 x tensor 1" in out and "replication factor" in out
  written = json.loads(path.read_text())
  assert set(written) == set(plan.JSON_KEYS) and written["mesh"]["fsdp"] == 2
  assert (tmp_path / "plan.hlo.txt").read_text().startswith("HloModule")
