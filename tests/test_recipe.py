"""docs/recipe.md against the configs: every value it claims is the config's, and every
hyper-parameter of every config it lists has its value in a row, so the page cannot drift.

The page's tables are read under `<!-- recipe: configs/<file>:<arg> ; ... -->` markers (the
configs a table describes). A row's `ours` cell claims values as `` `key = value` ``, or
`` `[arg] key = value` `` for the config with `arg` merged into the table's (e.g. `[size=small]`).
"""

import ast
import math
import os
import re

import pytest

from vidlankd_jax import configlib

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

# Configs the page must describe: each stage at the paper's sizes, every objective, every task.
REQUIRED = [
    ("teacher.py", "size=base"),
    ("teacher.py", "size=small"),
    ("distill.py", "size=base,objectives=nst"),
    ("distill.py", "size=small,objectives=nst"),
    *[
        ("distill.py", f"size=base,objectives={o}")
        for o in ("ntxent", "crd", "kd", "mse", "cos", "voken", "none")
    ],
    *[
        ("finetune.py", f"task={t}")
        for t in ("sst2", "qnli", "qqp", "mnli", "squad_v1", "squad_v2", "swag", "piqa", "tracie")
    ],
]


def parse_arg(arg: str) -> dict:
  return dict(item.split("=", 1) for item in filter(None, arg.split(",")))


def config_id(file: str, arg: dict) -> tuple:
  return file, ",".join(f"{k}={v}" for k, v in sorted(arg.items()))


def parse_value(text: str):
  """A claimed value: a Python literal, or a bare word (a string)."""
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
  claims, listed, tables, ours_column = [], set(), None, None
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
      continue
    if set(line.replace("|", "").strip()) <= set("-: "):
      continue
    for override, key, value in CLAIM.findall(cells[ours_column]):
      for file, arg in tables:
        cid = config_id(file, {**arg, **parse_arg(override)})
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
