"""Importing the released VidLanKD checkpoints: key map, forward parity with the PyTorch modules,
workdirs the distillation and fine-tuning stages read, and errors that name the key at fault.

The released checkpoints are rebuilt here with their real key names and random tiny weights: the
language side by transformers' BertForMaskedLM, the video side by a PyTorch re-implementation of
the released `VisnModel` (VideoBert + projection + MLP), saved as DistributedDataParallel does.
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from torch import nn

from vidlankd_jax import configlib
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax.evaluation import grounding
from vidlankd_jax.interop import hf_bert, vidlankd_torch
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax.train import distill

# The tiny size of configs/common.py (2 layers, 64 hidden, 2 heads, FFN 128), as configs read it.
HF_CONFIG = dict(
    vocab_size=30522,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    attn_implementation="eager",
)
VIDEO_DIM, PROJECTION, STEPS = 4096, 64, 12


class ReleasedVideoEncoder(nn.Module):
  """The released `BertVideoEncoder`: Linear D->1024 (here PROJECTION), Linear ->H, no nonlinearity."""

  def __init__(self, config):
    super().__init__()
    self.new_video_embeddings = nn.Sequential(
        nn.Linear(VIDEO_DIM, PROJECTION), nn.Linear(PROJECTION, config.hidden_size)
    )


class ReleasedVideoBert(nn.Module):
  """The released `VideoBert.forward`: embeddings added (and LayerNorm) here, then again in BertModel."""

  def __init__(self, config):
    super().__init__()
    self.bert = transformers.BertModel(config)
    self.video_encoder = ReleasedVideoEncoder(config)

  def forward(self, features, mask, token_type_ids, position_ids):
    emb = self.bert.embeddings
    x = self.video_encoder.new_video_embeddings(features)
    x = x + emb.position_embeddings(position_ids) + emb.token_type_embeddings(token_type_ids)
    x = emb.dropout(emb.LayerNorm(x))
    return self.bert(inputs_embeds=x, attention_mask=mask, token_type_ids=token_type_ids)[:2]


class ReleasedVisnModel(nn.Module):
  """The released `VisnModel`: pooled VideoBert output -> Linear, ReLU, Dropout(0.3), Linear -> unit."""

  def __init__(self, config):
    super().__init__()
    self.backbone = ReleasedVideoBert(config)
    self.mlp_map = nn.Sequential(
        nn.Linear(config.hidden_size, config.hidden_size),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(config.hidden_size, config.hidden_size),
    )

  def forward(self, features, mask):
    types = torch.ones_like(mask)  # the released training loop gives video steps token type 1
    positions = torch.arange(features.shape[1])[None].repeat(features.shape[0], 1)
    x = self.mlp_map(self.backbone(features, mask, types, positions)[1])
    return x / x.norm(2, dim=-1, keepdim=True)


class ReleasedHead(nn.Module):
  """A released student head (`kd1_student_head`/`kd2_student_head`): dense, GELU, LayerNorm, decoder."""

  def __init__(self, hidden):
    super().__init__()
    self.dense = nn.Linear(hidden, hidden)
    self.layer_norm = nn.LayerNorm(hidden, eps=1e-12)
    self.decoder = nn.Linear(hidden, hidden)

  def forward(self, x):
    return self.decoder(self.layer_norm(nn.functional.gelu(self.dense(x))))


def randomise(module, seed):
  """Non-trivial values everywhere (LayerNorm and biases included) so a misplaced tensor shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale = 1.0 if name.lower().endswith(("layernorm.weight", "layer_norm.weight")) else 0.0
      p.copy_(scale + 0.1 * torch.randn(p.shape, generator=gen))
  return module


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """Released-layout teacher and student folders, with the torch modules that wrote them."""
  torch.manual_seed(0)
  config = transformers.BertConfig(**HF_CONFIG)
  language = randomise(transformers.BertForMaskedLM(config), 1).eval()
  hinge = randomise(ReleasedHead(64), 2)  # the teacher's unused visual_hinge_head
  video = randomise(ReleasedVisnModel(config), 3).eval()
  teacher_dir = tmp_path_factory.mktemp("released_teacher")
  config.to_json_file(str(teacher_dir / "config.json"))
  lang_state = dict(language.state_dict())
  lang_state.update(
      {
          "visual_hinge_head." + k.replace("decoder", "linear_decoder"): v
          for k, v in hinge.state_dict().items()
      }
  )
  torch.save(lang_state, teacher_dir / vidlankd_torch.LANGUAGE_FILE)
  torch.save(
      {"module." + k: v for k, v in video.state_dict().items()},
      teacher_dir / vidlankd_torch.VIDEO_FILE,
  )

  student = randomise(transformers.BertForMaskedLM(config), 4).eval()
  head = randomise(ReleasedHead(64), 5).eval()
  teacher_head = randomise(ReleasedHead(64), 6)
  student_dir = tmp_path_factory.mktemp("released_student")
  config.to_json_file(str(student_dir / "config.json"))
  student_state = dict(student.state_dict())
  student_state.update({"kd1_student_head." + k: v for k, v in head.state_dict().items()})
  student_state.update({"kd2_teacher_head." + k: v for k, v in teacher_head.state_dict().items()})
  torch.save(student_state, student_dir / vidlankd_torch.LANGUAGE_FILE)
  return dict(
      teacher_dir=str(teacher_dir),
      student_dir=str(student_dir),
      language=language,
      video=video,
      student=student,
      head=head,
  )


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory, load_tool):
  tool = load_tool("import_vidlankd")
  teacher_workdir = str(tmp_path_factory.mktemp("teacher_workdir"))
  student_workdir = str(tmp_path_factory.mktemp("student_workdir"))
  assert (
      tool.main(["teacher", "--model_dir", released["teacher_dir"], "--workdir", teacher_workdir])
      == 0
  )
  assert (
      tool.main(["student", "--model_dir", released["student_dir"], "--workdir", student_workdir])
      == 0
  )
  return dict(teacher=teacher_workdir, student=student_workdir, tool=tool)


def inputs(batch=3, length=10, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, 6:] = 0
  types = np.zeros_like(ids)
  types[0, 5:] = 1
  return ids, mask, types


def flat(tree):
  return {"/".join(map(str, k)): v for k, v in _flatten(tree)}


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def test_every_released_tensor_lands_where_it_belongs(released, imported):
  params = flat(ckpt_lib.restore_params_numpy(os.path.join(imported["teacher"], "checkpoints")))
  video = {k: v.numpy() for k, v in released["video"].state_dict().items()}
  table = vidlankd_torch.video_key_map(2)
  assert set(table) | {"backbone.bert.embeddings.word_embeddings.weight"} >= set(video) - {
      "backbone.bert.embeddings.position_ids"
  }
  for key, (path, transform) in table.items():
    ours = params["video/" + "/".join(map(str, path))]
    theirs = video[key]
    if transform == "transpose":
      theirs = theirs.T
    elif transform == "swap_rows":  # released video steps are token type 1, ours 0
      theirs = theirs[[1, 0]]
    elif transform == "first_rows":  # 512 released rows, the tiny config reads 16 steps
      assert ours.shape[0] == 16 and theirs.shape[0] == 512
      theirs = theirs[:16]
    np.testing.assert_array_equal(ours, theirs, err_msg=key)
  language = {k: v.numpy() for k, v in released["language"].state_dict().items()}
  for key, (path, transpose) in hf_bert.encoder_key_map(2).items():
    if "bert." + key in language:
      ours = params["language/bert/" + "/".join(map(str, path))]
      np.testing.assert_array_equal(
          ours, language["bert." + key].T if transpose else language["bert." + key]
      )
  np.testing.assert_array_equal(params["language/mlm/bias"], language["cls.predictions.bias"])
  np.testing.assert_array_equal(
      params["language/mlm/transform/kernel"], language["cls.predictions.transform.dense.weight"].T
  )


def test_teacher_loads_in_distillation_and_matches_the_released_modules(released, imported):
  config = configlib.load("distill", "size=tiny,objectives=nst")
  config.teacher.workdir = imported["teacher"]
  config.teacher.video.embedding_passes = 2
  teacher = distill.load_teacher(config, sharding.single_device_mesh())
  ids, mask, types = inputs()
  with torch.no_grad():
    ref = released["language"](
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
        output_hidden_states=True,
    )
  hidden, logits = nnx.jit(lambda m, a, b, c: m(a, b, c))(teacher.language, ids, mask, types)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits) - ref.logits.numpy())[real].max() < 1e-4
  tokens = grounding.teacher_token_vectors(teacher, ids, mask, types)
  ref_hidden = ref.hidden_states[-1].numpy()
  ref_tokens = ref_hidden / np.linalg.norm(ref_hidden, axis=-1, keepdims=True)
  assert np.abs(tokens - ref_tokens)[real].max() < 1e-5

  rng = np.random.default_rng(1)
  features = rng.standard_normal((3, STEPS, VIDEO_DIM)).astype(np.float32)
  video_mask = np.ones((3, STEPS), np.int64)
  video_mask[2, 7:] = 0
  with torch.no_grad():
    ref_clip = released["video"](torch.tensor(features), torch.tensor(video_mask)).numpy()
  clip = grounding.teacher_clip_vectors(teacher, features, video_mask)
  assert clip.shape == (3, 64)
  assert np.abs(clip - ref_clip).max() < 1e-5
  assert np.abs(ref_clip[0] - ref_clip[1]).max() > 1e-2  # the clips differ: a real comparison


def test_workdirs_carry_the_fingerprints_and_configs_our_runs_write(imported):
  teacher_cfg = json.load(open(os.path.join(imported["teacher"], "config.json")))
  assert teacher_cfg["stage"] == "teacher" and teacher_cfg["video"]["embedding_passes"] == 2
  meta = ckpt_lib.CheckpointManager(
      os.path.join(imported["teacher"], "checkpoints"), every_steps=1, keep=1
  ).read_meta(0)
  config = configlib.load("distill", "size=tiny,objectives=nst")
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="video.embedding_passes"):
    ckpt_lib.check_fingerprint(
        meta["fingerprint"], runs.teacher_fingerprint(config.teacher), "teacher"
    )
  config.teacher.video.embedding_passes = 2  # what the import tool tells distillation runs to set
  assert meta["fingerprint"] == runs.teacher_fingerprint(config.teacher)
  student_meta = ckpt_lib.CheckpointManager(
      os.path.join(imported["student"], "checkpoints"), every_steps=1, keep=1
  ).read_meta(0)
  assert student_meta["fingerprint"] == ckpt_lib.fingerprint(config)  # tiny student, nst


def test_student_feeds_fine_tuning_and_matches_the_released_modules(released, imported):
  init = runs.read_initial_encoder(imported["student"], None, default_heads=12)
  assert init.architecture["num_heads"] == 2 and init.architecture["hidden_size"] == 64
  word = released["student"].state_dict()["bert.embeddings.word_embeddings.weight"].numpy()
  np.testing.assert_array_equal(init.params["embeddings/word_embeddings/embedding"], word)

  directory = os.path.join(imported["student"], "checkpoints")
  assert set(ckpt_lib.restore_params_numpy(directory)["kd_heads"]) == {"nst"}
  student = sharding.create_sharded(
      lambda: Student(
          BertConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
          ("nst",),
          teacher_hidden_size=64,
          rngs=nnx.Rngs(0),
      ),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  nnx.update(student, ckpt_lib.restore_params(directory, nnx.state(student, nnx.Param)))
  ids, mask, types = inputs(seed=2)
  with torch.no_grad():
    ref = released["student"](
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(types),
        output_hidden_states=True,
    )
    ref_head = released["head"](ref.hidden_states[-1]).numpy()
  ref_head /= np.linalg.norm(ref_head, axis=-1, keepdims=True)
  _, logits, _ = nnx.jit(lambda m, a, b, c: m(a, b, c))(student, ids, mask, types)
  real = mask.astype(bool)
  assert np.abs(np.asarray(logits) - ref.logits.numpy())[real].max() < 1e-4
  head = grounding.student_token_vectors(student, ids, mask, types, head="nst")
  assert np.abs(head - ref_head)[real].max() < 1e-5


def test_bad_checkpoints_raise_errors_naming_the_key(released, imported, tmp_path):
  tool = imported["tool"]
  video_state = vidlankd_torch.read_checkpoint(
      os.path.join(released["teacher_dir"], "visn_model.chkpt")
  )
  teacher = sharding.create_sharded(
      lambda: tool.Teacher.from_config(
          tool.teacher_config(
              hf_bert.config_from_hf(HF_CONFIG), vidlankd_torch.video_architecture(video_state, "v")
          )[0],
          rngs=nnx.Rngs(0),
      ),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  missing = {k: v for k, v in video_state.items() if k != "mlp_map.3.bias"}
  with pytest.raises(ValueError, match="mlp_map.3.bias"):
    vidlankd_torch.load_video(teacher.video, missing, "visn_model.chkpt")
  extra = {**video_state, "backbone.extra_head.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="backbone.extra_head.weight"):
    vidlankd_torch.load_video(teacher.video, extra, "visn_model.chkpt")
  key = "backbone.bert.encoder.layer.1.output.dense.weight"
  bad = {**video_state, key: np.zeros((64, 7), np.float32)}
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    vidlankd_torch.load_video(teacher.video, bad, "visn_model.chkpt")

  language = vidlankd_torch.read_checkpoint(
      os.path.join(released["teacher_dir"], "pytorch_model.bin")
  )
  with pytest.raises(ValueError, match=r"cls\.extra\.weight"):
    vidlankd_torch.load_language(
        teacher.language, {**language, "cls.extra.weight": np.zeros(2)}, "pytorch_model.bin"
    )
  gone = {k: v for k, v in language.items() if k != "bert.encoder.layer.0.attention.self.key.bias"}
  with pytest.raises(ValueError, match="attention.self.key.bias"):
    vidlankd_torch.load_language(teacher.language, gone, "pytorch_model.bin")

  # A folder without the video model: the error names the file.
  folder = tmp_path / "no_video"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(HF_CONFIG))
  with pytest.raises(FileNotFoundError, match="visn_model.chkpt"):
    tool.import_teacher(str(folder), str(tmp_path / "out"))
