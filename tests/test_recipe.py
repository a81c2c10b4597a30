"""docs/recipe.md against the configs: every value it claims is the config's, and every
hyper-parameter of every config it lists has its value in a row, so the page cannot drift.

The page's tables are read under `<!-- recipe: configs/<file>:<arg> ; ... -->` markers (the
configs a table describes). A row's `ours` cell claims values as `` `key = value` ``, or
`` `[arg] key = value` `` for the config with `arg` merged into the table's (e.g. `[size=small]`;
for a table config that already has `arg`, it replaces the cell's plain claim of that key). The `recipe=released` column claims the values of the same configs with `recipe=released`; a cell
without claims ("=") says they are the `ours` cell's.
"""

import ast
import math
import os
import re

import numpy as np
import pytest

from vidlankd_jax import configlib
from vidlankd_jax import losses
from vidlankd_jax import objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "docs", "recipe.md")
MARKER = re.compile(r"<!--\s*recipe:\s*(.+?)\s*-->")
CLAIM = re.compile(r"`(?:\[([^\]]*)\]\s*)?([A-Za-z_][\w.]*)\s*=\s*([^`]+?)\s*`")

# Config keys that are not hyper-parameters of the recipe: where files live, how often to log,
# save and evaluate, the device mesh, the numerics and form of the compute (dtype, fused
# attention, rematerialisation, scanned layers, video padding buckets), seeds, and the teacher run
# a student reads (its own table describes it).
NOT_RECIPE_PREFIXES = (
    "dtype",
    "data.video_bucket",
    "checkpoint.",
    "mesh.",
    "sharding_rules",
    "stage",
    "seed",
    "init.",
    "data.data_dir",
    "data.vocab_file",
    "data.shuffle_buffer",
    "data.synthetic",
    "data.swag_dir",
    "data.tracie_dir",
    "data.benchmarks_module",
    "train.log_every",
    "train.on_nonfinite",
    "train.max_skips_in_a_row",
    "train.input_timeout_s",
    "train.profile_steps",
    "eval.every_steps",
    "eval.batches",
    "eval.batch_size",
    "eval.retrieval_clips",
    "eval.glue_ax",
    "eval.glue_diagnostics_file",
    "eval.primary_metric",
    "teacher.workdir",
    "teacher.step",
    "teacher.size",
    "teacher.model.",
    "teacher.video.",
    "kd.voken.data_dir",
    "model.size",
    "video.size",
)
NOT_RECIPE_SUFFIXES = (".dtype", ".attention_impl", ".remat", ".scan_layers")
# Fine-tuning builds its model from the initial weights (their architecture) and masks nothing.
FINETUNE_UNUSED = ("data.mask_prob", "data.masking", "data.max_predictions", "model.")
FINETUNE_USED_MODEL_KEYS = ("model.hidden_dropout", "model.attention_dropout")

RELEASED = {"recipe": "released"}

# Configs the page must describe: each stage at the paper's sizes, every objective, every task,
# each with recipe=released too.
REQUIRED = [
    ("teacher.py", "size=base"),
    ("teacher.py", "size=small"),
    ("distill.py", "size=base,objectives=nst"),
    ("distill.py", "size=small,objectives=nst"),
    *[("distill.py", f"size=base,objectives={o}") for o in objectives.NAMES + ("none",)],
    *[
        ("finetune.py", f"task={t}")
        for t in ("sst2", "qnli", "qqp", "mnli", "squad_v1", "squad_v2", "swag", "piqa", "tracie")
    ],
]
REQUIRED += [(file, f"{arg},recipe=released") for file, arg in REQUIRED]


def parse_arg(arg: str) -> dict:
  return dict(item.split("=", 1) for item in filter(None, arg.split(",")))


def config_id(file: str, arg: dict) -> tuple:
  return file, ",".join(f"{k}={v}" for k, v in sorted(arg.items()))


def parse_value(text: str):
  """A claimed value: a Python literal, or a bare word (a string)."""
  if text in ("inf", "-inf"):
    return float(text)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def same(a, b) -> bool:
  if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
    return a is b or a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
  return a == b


def leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def recipe_keys(file: str, config) -> dict:
  """The config's hyper-parameters: every leaf but the operational ones."""
  out = {}
  for key, value in leaves(config.to_dict()):
    if key.startswith(NOT_RECIPE_PREFIXES) or key.endswith(NOT_RECIPE_SUFFIXES):
      continue
    if file == "finetune.py" and key.startswith(FINETUNE_UNUSED):
      if key not in FINETUNE_USED_MODEL_KEYS:
        continue
    out[key] = value
  return out


def lookup(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def read_claims():
  """(claims, listed): claims as (line number, config id, key, value text); every config id the
  page names (a table's or a claim's)."""
  with open(RECIPE, encoding="utf-8") as f:
    lines = f.read().splitlines()
  claims, listed, tables, ours_column, released_column = [], set(), None, None, None
  for number, line in enumerate(lines, start=1):
    marker = MARKER.search(line)
    if marker:
      tables = []
      for spec in marker.group(1).split(";"):
        file, _, arg = spec.strip().removeprefix("configs/").partition(":")
        tables.append((file, parse_arg(arg)))
        listed.add(config_id(file, parse_arg(arg)))
      ours_column = None
      continue
    if tables is None or not line.startswith("|"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if ours_column is None:
      names = [c.lower() for c in cells]
      assert any(n.startswith("ours") for n in names), f"recipe.md:{number}: no 'ours' column"
      ours_column = next(i for i, n in enumerate(names) if n.startswith("ours"))
      released_column = next(i for i, n in enumerate(names) if "recipe=released" in n)
      continue
    if set(line.replace("|", "").strip()) <= set("-: "):
      continue
    released_claims = CLAIM.findall(cells[released_column])
    for recipe, cell_claims in (
        ({}, CLAIM.findall(cells[ours_column])),
        (RELEASED, released_claims or CLAIM.findall(cells[ours_column])),
    ):
      for file, arg in tables:
        base = {**arg, **recipe}
        # A claim whose `[arg]` the table's config already has is the more specific: the
        # cell's plain claims of that key do not apply to that config.
        specific = {k for o, k, _ in cell_claims if o and {**base, **parse_arg(o)} == base}
        for override, key, value in cell_claims:
          if not override and key in specific:
            continue
          cid = config_id(file, {**base, **parse_arg(override)})
          listed.add(cid)
          claims.append((number, cid, key, value))
  return claims, listed


@pytest.fixture(scope="module")
def page():
  claims, listed = read_claims()
  configs = {cid: configlib.load(cid[0].removesuffix(".py"), cid[1]) for cid in listed}
  return claims, listed, configs


def test_every_claimed_value_is_the_configs(page):
  claims, _, configs = page
  assert len(claims) > 100
  wrong = []
  for number, cid, key, text in claims:
    try:
      actual = lookup(configs[cid], key)
    except KeyError:
      wrong.append(f"recipe.md:{number}: {cid[0]}:{cid[1]} has no key {key}")
      continue
    if not same(actual, parse_value(text)):
      wrong.append(f"recipe.md:{number}: {cid[0]}:{cid[1]} {key} is {actual!r}, page says {text}")
  assert not wrong, "\n".join(wrong)


def test_every_hyper_parameter_of_every_listed_config_has_its_value_in_a_row(page):
  claims, listed, configs = page
  missing_configs = [c for c in REQUIRED if config_id(c[0], parse_arg(c[1])) not in listed]
  assert not missing_configs, f"configs the page does not describe: {missing_configs}"
  documented = {}  # (stage file, key) -> the values rows give it
  for _, cid, key, _ in claims:
    documented.setdefault((cid[0], key), []).append(lookup(configs[cid], key))
  missing = []
  for cid in sorted(listed):
    for key, value in recipe_keys(cid[0], configs[cid]).items():
      if not any(same(value, v) for v in documented.get((cid[0], key), [])):
        missing.append(f"{cid[0]}:{cid[1]} {key} = {value!r}")
  assert not missing, "values no row of docs/recipe.md gives:\n" + "\n".join(missing)


def test_the_readme_links_the_recipe():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    assert "docs/recipe.md" in f.read()


def test_the_objectives_table_is_generated_from_the_declarations():
  with open(RECIPE, encoding="utf-8") as f:
    text = f.read()
  start, end = text.find(objectives.RECIPE_BEGIN), text.find(objectives.RECIPE_END)
  assert 0 <= start < end, "docs/recipe.md has no generated objectives table"
  assert (
      text[start : end + len(objectives.RECIPE_END)] == objectives.recipe_table()
  ), "docs/recipe.md's objectives table is stale: python -m vidlankd_jax.objectives docs/recipe.md"


def released_step(call_value, student, teacher, mask):
  """The released optimiser step's objective: the mean of its 8 per-GPU calls of 32 sequences
  (2 accumulation steps, each call's loss halved and summed; DDP averages over 4 GPUs)."""
  calls = objectives.RELEASED_CALL_SEQUENCES
  return np.mean(
      [
          float(call_value(student[i : i + calls], teacher[i : i + calls], mask[i : i + calls]))
          for i in range(0, len(student), calls)
      ]
  )


@pytest.mark.parametrize(
    "name, released_call",
    [
        ("nst", lambda s, t, m: losses.released_nst_per_call(s, t)),
        # contrastive_loss_item: the mean cross-entropy of the call's 2b anchors, divided by 2b.
        ("ntxent", lambda s, t, m: losses.nt_xent_loss(s, t, 1.0, m) / (2 * len(s))),
    ],
)
def test_the_default_weight_gives_the_released_step_at_the_released_shapes(name, released_call):
  """weight x our per-example term over the released step's 256 sequences of L = 128 equals the
  released step's objective, the mean of its eight per-GPU calls."""
  config = configlib.load("distill", f"size=base,objectives={name}")
  assert config.data.seq_len == objectives.RELEASED_SEQ_LEN and config.train.batch_size == 256
  rng = np.random.default_rng(0)
  shape = (256, objectives.RELEASED_SEQ_LEN, 8)
  student, teacher = (
      np.asarray(losses.l2_normalize(rng.standard_normal(shape).astype(np.float32)))
      for _ in range(2)
  )
  mask = np.ones(shape[:2], np.int32)
  term = objectives.OBJECTIVES[name].term(
      objectives.TermInputs(
          head=student, targets=teacher, batch={"attention_mask": mask}, settings=config.kd
      )
  )
  ours = config.kd.weights[name] * float(term.value)
  assert ours == pytest.approx(released_step(released_call, student, teacher, mask), rel=1e-5)
  assert objectives.released_weights(config)[name] == pytest.approx(config.kd.weights[name])


# ---------------------------------------------------------------------------------------------
# What recipe=released changes, beyond the values the page lists.


def test_recipe_argument_is_checked_and_keeps_size():
  config = configlib.load("distill", "size=base,recipe=released")
  assert config.model.num_layers == 12 and config.optimizer.decay_head_layer_norms
  with pytest.raises(ValueError, match="unknown recipe 'reléased'"):
    configlib.load("teacher", "size=base,recipe=reléased")


def test_released_teacher_schedule_ends_with_90_percent_of_the_peak():
  """Linear decay over 200 nominal epochs, stopped after 20: at the run's last step the rate is
  1 - 20 / 200 = 0.9 of the peak (no warmup); the paper's recipe reaches 0."""
  from vidlankd_jax import train_state

  for recipe, left in (("paper", 0.0), ("released", 0.9)):
    config = configlib.load("teacher", f"size=base,recipe={recipe}")
    schedule = train_state.learning_rate_schedule(config.optimizer, 100)
    peak = config.optimizer.learning_rate
    assert float(schedule(0)) == pytest.approx(peak)
    assert float(schedule(50)) == pytest.approx(peak * (1 - 50 / (100 / (1 - left))), rel=1e-5)
    assert float(schedule(100)) == pytest.approx(peak * left, rel=1e-5, abs=1e-12)


def test_released_weight_decay_reaches_the_kd_heads_layer_norm_scales():
  """The release's no-decay names ("bias", "LayerNorm.weight") miss its heads' layer_norm.weight:
  with the flag, exactly those scales are decayed; the encoder's LayerNorms and biases never."""
  import numpy as np

  from vidlankd_jax import train_state

  ones = np.ones(4, np.float32)
  params = {
      "kd_heads": {
          "nst": {
              "layer_norm": {"scale": ones, "bias": ones},
              "output": {"kernel": ones[:, None] * ones},
          }
      },
      "language": {"layer_norm": {"scale": ones, "bias": ones}},
  }
  paper = train_state.decay_mask(params)
  released = train_state.decay_mask(params, head_layer_norms=True)
  assert not paper["kd_heads"]["nst"]["layer_norm"]["scale"]
  assert released["kd_heads"]["nst"]["layer_norm"]["scale"]
  for mask in (paper, released):
    assert mask["kd_heads"]["nst"]["output"]["kernel"]
    assert not mask["kd_heads"]["nst"]["layer_norm"]["bias"]
    assert not mask["language"]["layer_norm"]["scale"]


def test_released_video_mask_skips_steps_whose_last_feature_is_zero():
  """Step 2's last feature is 0: with mask_rule=last_channel the encoder reads the clip as if
  step 2 were padding; with the default it is attended."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from vidlankd_jax import sharding
  from vidlankd_jax.models.bert import BertConfig
  from vidlankd_jax.models.video import VideoEncoder

  cfg = BertConfig.from_config(configlib.bert_config("tiny"), dtype="float32")
  features = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
  features[0, 2, -1] = 0.0
  mask = jnp.ones((1, 5), jnp.int32)
  mesh = sharding.single_device_mesh()
  encoders = {
      rule: sharding.create_sharded(
          lambda rule=rule: VideoEncoder(
              cfg, input_dim=8, projection_dim=16, max_steps=8, mask_rule=rule, rngs=nnx.Rngs(0)
          ),
          mesh,
          configlib.logical_axis_rules(),
      )
      for rule in ("steps", "last_channel")
  }
  released = encoders["last_channel"].encode_steps(jnp.asarray(features), mask)
  padded = encoders["steps"].encode_steps(jnp.asarray(features), mask.at[0, 2].set(0))
  attended = encoders["steps"].encode_steps(jnp.asarray(features), mask)
  np.testing.assert_allclose(
      np.asarray(released)[0, [0, 1, 3, 4]],
      np.asarray(padded)[0, [0, 1, 3, 4]],
      rtol=1e-5,
      atol=1e-6,
  )
  assert np.abs(np.asarray(attended - padded)[0, [0, 1, 3, 4]]).max() > 1e-4


def test_distillation_reads_its_corpus_in_order_and_the_teacher_shuffles():
  """The loop passes `data.shuffle` to the training stream: False for distillation at the
  paper's sizes (the released run has no --shuffle), True for the teacher (its sampler
  shuffles) and for the tiny test size."""
  from vidlankd_jax.train import loop

  for stage, arg, shuffle in (
      ("distill", "size=base", False),
      ("distill", "size=small,recipe=released", False),
      ("distill", "size=tiny", True),
      ("teacher", "size=base", True),
  ):
    config = configlib.load(stage, arg)
    program = loop.pretraining_program(
        config,
        None,
        None,
        state=None,
        train_step=None,
        eval_step=None,
        evaluate=None,
        fingerprint={},
    )
    assert program.train_batches.keywords["shuffle"] is shuffle, (stage, arg)
