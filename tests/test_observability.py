"""What a run tells its operator: console lines once per job (process 0), named scopes on every
model block and loss term in the compiled steps, and a profiler trace of the steps asked for."""

import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import sharding
from vidlankd_jax.data import synthetic
from vidlankd_jax.models import heads
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.train import loop
from vidlankd_jax.train import teacher as teacher_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scopes(lowered) -> set[str]:
  """The named-scope components of a lowered program's operations (transforms such as
  `jvp(...)` and `transpose(...)` unwrapped), from its debug locations (source files left out;
  a scanned body's operations carry the scopes inside the scan)."""
  found = set()
  for stack in re.findall(r'loc\("([^"]+)"', lowered.as_text(debug_info=True)):
    if ".py" not in stack and not stack.startswith("/"):
      found.update(re.sub(r"^(?:\w+\()+|\)+$", "", part) for part in stack.split("/"))
  return found


@pytest.mark.parametrize(
    "process, out, err",
    [
        ((0, 1), "progress\n", "careful\n"),
        ((0, 4), "progress\n", "[process 0] careful\n"),
        ((3, 4), "", "[process 3] careful\n"),
    ],
)
def test_console_lines_come_once_per_job_and_warnings_from_every_process(
    process, out, err, capsys, monkeypatch
):
  monkeypatch.setattr(console, "_process", lambda: process)
  console.info("progress")
  console.debug("hidden unless verbose")
  console.warning("careful")
  captured = capsys.readouterr()
  assert (captured.out, captured.err) == (out, err)


def test_verbose_console_adds_the_debug_lines(capsys):
  console.set_verbose(True)
  try:
    console.debug("shardings: %d arrays", 3)
  finally:
    console.set_verbose(False)
  console.debug("not shown")
  assert capsys.readouterr().out == "shardings: 3 arrays\n"


def test_profile_steps_is_a_window_or_nothing():
  assert configlib.profile_window("") is None
  assert configlib.profile_window(" 2:5 ") == (2, 5)
  for bad in ("5", "5:5", "6:2", "-1:3", "a:b", "1:2:3"):
    with pytest.raises(errors.ConfigError, match="config.train.profile_steps"):
      configlib.profile_window(bad)
  config = configlib.load("teacher", "size=tiny")
  config.train.profile_steps = "3"
  with pytest.raises(errors.ConfigError, match="config.train.profile_steps"):
    configlib.validate(config, jax.device_count())


@pytest.fixture(scope="module")
def teacher_program(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("observability") / "data")
  synthetic.prepare_video_text(data_dir, log=lambda *_: None)
  config = configlib.load("teacher", "size=tiny")
  config.data.data_dir = data_dir
  config.train.steps = 3
  config.train.log_every = 1
  config.eval.every_steps = 3
  config.eval.batches = 1
  config.eval.retrieval_clips = 16
  config.checkpoint.every_steps = 3
  mesh = sharding.make_mesh(config.mesh)
  return config, mesh, teacher_train.build(config, mesh)


@pytest.mark.slow  # a whole (tiny) run through the loop
def test_a_run_with_profile_steps_writes_a_trace_of_those_steps(teacher_program, tmp_path, capsys):
  config, mesh, program = teacher_program
  config.train.profile_steps = "1:3"
  loop.fit(program, config, str(tmp_path), mesh)
  out = capsys.readouterr().out
  assert "[step 3] " in out  # the progress line is unchanged
  assert f"profile of steps 2-3 written to {tmp_path / 'profile'}" in out
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with open(traces[0], "rb") as f:
    trace = f.read()
  for scope in (b"attention", b"mlm_loss", b"contrastive_loss", b"video_encoder"):
    assert scope in trace, scope


def test_the_teacher_step_names_every_block_and_loss(teacher_program):
  _, mesh, program = teacher_program
  batch = sharding.global_batch(next(program.train_batches(start_step=0)), mesh)
  found = scopes(jax.jit(program.train_step).lower(program.state, batch))
  expected = {"bert", "embeddings", "layers", "layer", "attention", "mlp", "mlm_head"}
  expected |= {"video_encoder", "video_embeddings", "clip_head", "mlm_loss", "contrastive_loss"}
  assert expected <= found, expected - found


def test_the_distillation_step_names_the_towers_heads_and_each_kd_term():
  path = os.path.join(REPO, "bench", "distill_step.py")
  spec = importlib.util.spec_from_file_location("distill_step", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  config = configlib.load("distill", "size=tiny,objectives=nst+mse+kd")
  config.model.scan_layers = False  # unrolled: each layer under its own name
  mesh = sharding.make_mesh(config.mesh)
  setup, step = bench.setup_and_step(config, mesh)
  batch = sharding.global_batch(bench.random_batch(config), mesh)
  found = scopes(step.lower(setup.state, batch))
  expected = {"student", "teacher", "layer_0", "layer_1", "mlm_loss", "nst_head", "mse_head"}
  expected |= {"kd_nst", "kd_mse", "kd_kd"}
  assert expected <= found, expected - found


@pytest.mark.parametrize(
    "kind, scope",
    [("classification", "classifier"), ("span", "span_head"), ("multiple_choice", "choice_head")],
)
def test_the_fine_tuning_heads_are_named(kind, scope):
  config = configlib.load("teacher", "size=tiny")
  cfg = BertConfig.from_config(config.model)
  model = sharding.create_sharded(
      lambda: heads.build_head(kind, cfg, 2, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      config.sharding_rules,
  )
  shape = (2, 3, 8) if kind == "multiple_choice" else (2, 8)
  ids = jnp.ones(shape, jnp.int32)
  found = scopes(jax.jit(lambda ids: model(ids, jnp.ones_like(ids))).lower(ids))
  assert scope in found and "attention" in found
