"""A run's directory, opened one way by every stage and tool.

Every training run writes `<workdir>/config.json` (its resolved config) and Orbax checkpoints
under `<workdir>/checkpoints/`. Later stages and tools read runs only through this module: the
frozen teacher of a distillation run, the encoder a fine-tuning run starts from, the models of
the grounding tool and the demo's probe, the language model the Hugging Face export writes.
A path may name the workdir or its `checkpoints/` folder; local folders and gs:// buckets alike.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from vidlankd_jax import console
from vidlankd_jax import errors
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import sharding
from vidlankd_jax.models import layout
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM
from vidlankd_jax.models.student import Student
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.objectives import VOKEN_OBJECTIVE, parse_objectives

HF_PREFIX = "hf:"
SCRATCH = "scratch"
AUTO_SIZE = "auto"
# What fixes the shape of a BERT encoder's weights (the rest of BertConfig is free to differ).
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


class Run:
  """A run directory: `workdir` (with config.json) and `checkpoint_dir` (the Orbax manager's)."""

  def __init__(self, path: str):
    if not path:
      raise errors.DataError("empty run directory: name a teacher, student or fine-tuning workdir")
    path = epath.Path(str(path).rstrip("/"))
    self.path = str(path)
    if (path / "checkpoints").is_dir():
      self.workdir, self.checkpoint_dir = str(path), str(path / "checkpoints")
    else:
      self.workdir, self.checkpoint_dir = str(path.parent), str(path)

  def __repr__(self) -> str:
    return f"Run({self.path!r})"

  def exists(self) -> bool:
    return epath.Path(self.checkpoint_dir).is_dir()

  def check_exists(self, what: str = "run") -> None:
    if not self.exists():
      raise errors.MissingFileError(
          f"{self.path}: no checkpoints folder (is it a {what} workdir? training writes "
          "<workdir>/checkpoints)"
      )

  @property
  def config_path(self) -> epath.Path:
    return epath.Path(self.workdir) / "config.json"

  def config(self) -> ml_collections.ConfigDict | None:
    """The run's resolved config (config.json), or None when it has none."""
    if not self.config_path.is_file():
      return None
    return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))

  def require_config(self, stage: str | None = None) -> ml_collections.ConfigDict:
    """The run's config; an error naming the file when it is missing or of another stage."""
    config = self.config()
    if config is None:
      raise errors.MissingFileError(f"{self.config_path}: missing; is {self.path} a run's workdir?")
    if stage is not None and config.get("stage") != stage:
      raise errors.DataError(
          f"{self.config_path}: a {config.get('stage')!r} run, not a {stage!r} run as expected"
      )
    self.check_config_describes_weights(config)
    return config

  def check_config_describes_weights(self, config) -> None:
    """IncompatibleCheckpointError unless config.json's model sizes are those the newest
    checkpoint was written with: a model built from a config.json that a later, rejected rerun
    overwrote (older runs) must not be filled with weights of another shape or meaning."""
    if config.get("stage") not in ("teacher", "distill"):
      return  # fine-tuning runs record their own fingerprint (the task and the encoder)
    meta = ckpt_lib.read_meta(self.checkpoint_dir) if self.exists() else None
    saved = (meta or {}).get("fingerprint", {})
    current = ckpt_lib.fingerprint(config)
    diffs = [
        f"{k}: config.json {current[k]!r} vs checkpoint {saved[k]!r}"
        for k in sorted(set(saved) & set(current))
        if k.split(".")[0] in ("model", "video", "student") and saved[k] != current[k]
    ]
    if diffs:
      raise ckpt_lib.IncompatibleCheckpointError(
          f"{self.config_path} does not describe the weights in {self.checkpoint_dir} "
          f"({'; '.join(diffs)}): restore the config.json the checkpoint was trained with"
      )

  def params_numpy(self, step: int | None = None) -> dict:
    """The checkpoint's params as nested dicts of host numpy arrays (whatever mesh wrote them)."""
    self.check_exists()
    return ckpt_lib.restore_params_numpy(self.checkpoint_dir, step)

  def restore_params(self, abstract, step: int | None = None, fingerprint: dict | None = None):
    """The checkpoint's params onto `abstract`'s shardings, fingerprint-checked, read-only."""
    self.check_exists()
    return ckpt_lib.restore_params(self.checkpoint_dir, abstract, step, fingerprint)


def write_config(config, directory: str) -> None:
  """Records the resolved config (after command-line overrides) as `<directory>/config.json`."""
  if jax.process_index() != 0:
    return
  path = epath.Path(directory)  # local folders and gs:// buckets alike
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def step_or_latest(step: int) -> int | None:
  """Config convention: a negative step means the latest checkpoint."""
  return None if step is None or step < 0 else int(step)


def load_flat_params(module: nnx.Module, flat: dict, source: str) -> None:
  """Copies `flat` ("a/b/kernel" -> numpy array, one entry per layer as on disk) into `module`'s
  params in place, keeping their shardings and dtypes; a missing key or another shape is an
  error naming `source`."""
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    key = "/".join(map(str, path))
    current = var.get_value()
    per_layer = layout.flat_per_layer_keys(key, current.shape[0]) if current.ndim else None
    if key in flat:
      value = flat[key]
    elif per_layer and all(k in flat for k in per_layer):
      value = np.stack([np.asarray(flat[k]) for k in per_layer])
    else:
      raise errors.DataError(f"{source}: the checkpoint lacks {per_layer[0] if per_layer else key}")
    if tuple(value.shape) != tuple(current.shape):
      raise errors.DataError(f"{source}: {key} has shape {value.shape}, the model {current.shape}")
    var.set_value(jax.device_put(jnp.asarray(value, current.dtype), current.sharding))


# ---------------------------------------------------------------------------------- teachers


def teacher_fingerprint(teacher_cfg) -> dict:
  """The fingerprint a teacher run with this architecture (`model`, `video`) wrote."""
  return ckpt_lib.fingerprint(
      ml_collections.ConfigDict(
          {"stage": "teacher", "model": teacher_cfg.model, "video": teacher_cfg.video}
      )
  )


def build_teacher(
    teacher_cfg, mesh, rules, *, dtype: str | None = None, abstract: bool = False
) -> Teacher:
  """A fresh teacher `teacher_cfg` (`model`, `video`) describes, sharded on `mesh`, computing in
  `dtype` (`abstract`: shapes and shardings only)."""
  return sharding.create_sharded(
      lambda: Teacher.from_config(teacher_cfg, dtype=dtype, rngs=nnx.Rngs(0)),
      mesh,
      rules,
      abstract=abstract,
  )


def load_teacher(
    teacher_cfg, run: Run, mesh, rules, *, step: int | None = None, dtype: str | None = None
) -> Teacher:
  """The teacher `teacher_cfg` (`model`, `video`) describes, with `run`'s trained params,
  sharded on `mesh`, computing in `dtype`; a checkpoint of another architecture is an error
  naming each difference."""
  teacher = build_teacher(teacher_cfg, mesh, rules, dtype=dtype)
  params = nnx.state(teacher, nnx.Param)
  nnx.update(teacher, run.restore_params(params, step, teacher_fingerprint(teacher_cfg)))
  console.debug("teacher restored from %s", run.checkpoint_dir)
  return teacher


def load_teacher_run(path: str, mesh, *, step: int | None = None):
  """(teacher, its config) of a teacher run, its architecture read from its config.json."""
  run = Run(path)
  config = run.require_config("teacher")
  return load_teacher(config, run, mesh, sharding.DEFAULT_RULES, step=step), config


# ---------------------------------------------------------------------------------- students


def build_student(
    config, mesh, *, heads=None, num_vokens: int = 0, abstract: bool = False
) -> Student:
  """A fresh student of a distillation config (`model`, `kd.objectives`, the teacher's width),
  with the heads of `heads` (default: every objective's); `abstract`: shapes and shardings."""
  objectives = parse_objectives(config.kd.objectives) if heads is None else tuple(heads)
  return sharding.create_sharded(
      lambda: Student(
          BertConfig.from_config(config.model, dtype=config.get("dtype")),
          objectives,
          teacher_hidden_size=config.teacher.model.hidden_size,
          num_vokens=num_vokens,
          rngs=nnx.Rngs(config.seed),
      ),
      mesh,
      config.sharding_rules,
      abstract=abstract,
  )


def load_student(path: str, mesh, *, heads=None, step: int | None = None) -> Student:
  """A distillation run's student (its config.json's architecture), with the distillation heads
  named in `heads` (default: all of the run's); other heads are left out."""
  run = Run(path)
  config = run.require_config("distill")
  objectives = parse_objectives(config.kd.objectives)
  missing = [h for h in heads or () if h not in objectives]
  if missing:
    raise errors.DataError(
        f"{run.path}: the student has no {missing} head(s); its objectives are "
        f"{'+'.join(objectives) or 'none'}"
    )
  params = traverse_util.flatten_dict(run.params_numpy(step), sep="/")
  voken_kernel = params.get(f"kd_heads/{VOKEN_OBJECTIVE}/output/kernel")
  num_vokens = 0 if voken_kernel is None else int(voken_kernel.shape[1])
  student = build_student(config, mesh, heads=heads, num_vokens=num_vokens)
  load_flat_params(student, params, run.path)
  return student


# ----------------------------------------------------------------------- language encoders


@dataclasses.dataclass
class InitialEncoder:
  """Where an encoder's weights come from, their architecture and (unless scratch) the weights."""

  source: str
  architecture: dict | None = None
  params: dict | None = None  # flat "embeddings/word_embeddings/embedding" -> numpy array
  hf_state: dict | None = None  # a Hugging Face state dict (hf:<dir>)


def architecture_from_params(bert: dict, where: str) -> dict:
  """Encoder sizes read off the array shapes (all but the number of heads)."""
  try:
    vocab, hidden = bert["embeddings/word_embeddings/embedding"].shape
    layers = sorted({int(k.split("/")[2]) for k in bert if k.startswith("encoder/layers/")})
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_layers": len(layers),
        "intermediate_size": bert["encoder/layers/0/intermediate/kernel"].shape[1],
        "max_position_embeddings": bert["embeddings/position_embeddings/embedding"].shape[0],
        "type_vocab_size": bert["embeddings/token_type_embeddings/embedding"].shape[0],
    }
  except KeyError as e:
    raise errors.DataError(
        f"{where}: the language encoder lacks {e}; is this a BERT checkpoint?"
    ) from e


def saved_num_heads(run: Run, shapes: dict) -> int | None:
  """num_heads in the run's config.json (`model`: the teacher's or student's language BERT),
  if that config describes weights of these `shapes`."""
  config = run.config()
  if config is not None:
    run.check_config_describes_weights(config)
  model = {} if config is None else config.get("model", {})
  if all(model.get(k) == shapes[k] for k in ("hidden_size", "num_layers", "intermediate_size")):
    return int(model["num_heads"])
  return None


def language_params(run: Run, step: int | None = None) -> dict:
  """The flat params of a teacher's or student's language model (`params["language"]`)."""
  params = run.params_numpy(step)
  if "language" not in params or "bert" not in params["language"]:
    raise errors.DataError(
        f"{run.checkpoint_dir}: the checkpoint's params have no language/bert encoder "
        f"(top-level keys: {sorted(params)}); only teacher and student runs carry one"
    )
  return traverse_util.flatten_dict(params["language"], sep="/")


def read_initial_encoder(source: str, step: int | None, default_heads: int) -> InitialEncoder:
  """The weights `source` names ("scratch", "hf:<dir>" or a teacher/student workdir) and their
  architecture; the number of heads comes from the run's config.json (else `default_heads`)."""
  from vidlankd_jax.interop import hf_bert

  if source == SCRATCH:
    return InitialEncoder(source)
  if source.startswith(HF_PREFIX):
    model_dir = source[len(HF_PREFIX) :]
    arch = {k: getattr(hf_bert.read_config(model_dir), k) for k in ARCHITECTURE_KEYS}
    return InitialEncoder(source, arch, hf_state=hf_bert.read_state_dict(model_dir))
  run = Run(source)
  if not run.exists():
    raise errors.MissingFileError(
        f"config.init.source {source!r}: no such run; expected 'scratch', "
        "'hf:<Hugging Face BERT dir>' or a teacher/student workdir"
    )
  flat = language_params(run, step)
  bert = {k[len("bert/") :]: v for k, v in flat.items() if k.startswith("bert/")}
  arch = architecture_from_params(bert, run.checkpoint_dir)
  num_heads = saved_num_heads(run, arch)
  if num_heads is None:
    console.warning(
        "%s has no config.json matching its weights: assuming %d attention heads",
        run.workdir,
        default_heads,
    )
  arch["num_heads"] = default_heads if num_heads is None else num_heads
  return InitialEncoder(source, arch, params=bert)


def encoder_config(model_cfg, init: InitialEncoder, dtype: str | None = None) -> BertConfig:
  """The encoder's BertConfig: `model_cfg`, with the initial weights' architecture.

  With `model_cfg.size == "auto"` the architecture is the weights'; with a named size it must
  equal theirs, else a ValueError lists each difference.
  """
  cfg = BertConfig.from_config(model_cfg, dtype=dtype)
  if init.architecture is None:
    if model_cfg.size == AUTO_SIZE:
      raise errors.DataError(
          "config.model.size 'auto' takes the size from the initial weights, but "
          "config.init.source is 'scratch': pass a size (e.g. size=small)"
      )
    return cfg
  if model_cfg.size != AUTO_SIZE:
    diffs = [
        f"{k}: weights {init.architecture[k]} vs config {getattr(cfg, k)}"
        for k in ARCHITECTURE_KEYS
        if init.architecture[k] != getattr(cfg, k)
    ]
    if diffs:
      raise errors.DataError(
          f"config.model (size={model_cfg.size}) does not match the encoder in "
          f"{init.source}:\n  "
          + "\n  ".join(diffs)
          + "\nuse size=auto to take the size from the weights"
      )
  return dataclasses.replace(cfg, **init.architecture)


def load_encoder(bert: nnx.Module, init: InitialEncoder) -> None:
  """Copies the initial weights into `bert` (a BertModel) in place, keeping its shardings."""
  from vidlankd_jax.interop import hf_bert

  if init.hf_state is not None:
    hf_bert.load_state_dict(bert, init.hf_state)
  elif init.params is not None:
    load_flat_params(bert, init.params, init.source)


def load_language_model(
    path: str, step: int | None = None, num_heads: int = 0
) -> tuple[BertForMaskedLM, ml_collections.ConfigDict]:
  """A teacher's or student's language BERT with its MLM head (one device), and its config
  (empty when the run has no config.json, then `num_heads` must be given)."""
  run = Run(path)
  flat = language_params(run, step)
  if not any(k.startswith("mlm/") for k in flat):
    raise errors.DataError(f"{run.checkpoint_dir}: the language model has no MLM head")
  bert = {k[len("bert/") :]: v for k, v in flat.items() if k.startswith("bert/")}
  arch = architecture_from_params(bert, run.checkpoint_dir)
  saved_heads = saved_num_heads(run, arch)
  if num_heads and saved_heads and num_heads != saved_heads:
    raise errors.DataError(
        f"--num_heads {num_heads} differs from {run.config_path}'s {saved_heads}"
    )
  arch["num_heads"] = num_heads or saved_heads
  if not arch["num_heads"]:
    raise errors.DataError(f"{run.config_path} does not describe these weights: pass --num_heads")
  config = run.config() or ml_collections.ConfigDict()
  eps = config.get("model", {}).get("layer_norm_eps", BertConfig.layer_norm_eps)
  model = sharding.create_sharded(
      lambda: BertForMaskedLM(BertConfig(**arch, layer_norm_eps=eps), rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  load_flat_params(model, flat, run.path)
  return model, config
