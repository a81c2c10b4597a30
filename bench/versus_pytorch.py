"""Our distillation and teacher steps against the same steps in PyTorch + transformers, on the CPU.

Both frameworks run in this one process with the same number of threads, on the same shapes,
in interleaved rounds (ours, then theirs, `--rounds` times); each round's figure is the mean
step time of `--steps` steps, and the table gives the median over rounds and the ratio
PyTorch / ours (above 1: ours is faster). The PyTorch steps are written as well as we know how:

* distillation (NST): transformers' `BertForMaskedLM` student with SDPA attention, the MLM head
  run only at the masked positions, a distillation head (Linear, GELU, LayerNorm, Linear, L2
  normalisation), NST through batched L x L Gram matrices, a frozen `BertModel` teacher under
  `torch.no_grad`, AdamW (foreach) with global-norm clipping;
* teacher: `BertForMaskedLM` plus a video tower (Linear 4096 -> 1024 -> H, position and type
  embeddings, LayerNorm, a transformers `BertEncoder`, pooler, clip MLP), the paired token-level
  hinge loss and MLM at the masked positions, AdamW with clipping.

Ours is the training loop's own jitted step (float32 on the CPU, dropout on, as in training).

    python bench/versus_pytorch.py                      # small (6L/512H), batch 8, 1 thread
    python bench/versus_pytorch.py --threads 2 --rounds 3
    python bench/versus_pytorch.py --size tiny --batch 4 --rounds 2 --steps 2   # a quick look

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small", help="student = teacher size (configlib.MODEL_SIZES)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--max_predictions", type=int, default=20)
  p.add_argument("--video_steps", type=int, default=384)
  p.add_argument("--threads", type=int, default=1, help="threads of each framework")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="steps per round")
  p.add_argument("--which", default="distill,teacher")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:  # before JAX starts: one XLA CPU thread
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from vidlankd_jax import configlib  # noqa: E402
from vidlankd_jax import sharding  # noqa: E402
from vidlankd_jax.train import loop  # noqa: E402
from vidlankd_jax.train import teacher as teacher_train  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_step import random_batch, setup_and_step  # noqa: E402

# ------------------------------------------------------------------------------- PyTorch


def hf_config(model_cfg, **kw) -> transformers.BertConfig:
  return transformers.BertConfig(
      vocab_size=model_cfg.vocab_size,
      hidden_size=model_cfg.hidden_size,
      num_hidden_layers=model_cfg.num_layers,
      num_attention_heads=model_cfg.num_heads,
      intermediate_size=model_cfg.intermediate_size,
      hidden_dropout_prob=model_cfg.hidden_dropout,
      attention_probs_dropout_prob=model_cfg.attention_dropout,
      attn_implementation="sdpa",
      **kw,
  )


def masked_lm_loss(cls_head, hidden, batch):
  """MLM cross-entropy of the head run at the masked positions only."""
  positions = batch["mlm_positions"].long()
  gathered = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
  logits = cls_head(gathered)
  ce = F.cross_entropy(
      logits.flatten(0, 1), batch["mlm_targets"].long().flatten(), reduction="none"
  )
  weights = batch["mlm_weights"].flatten()
  return (ce * weights).sum() / weights.sum()


def nst(student, teacher):
  """The released NST value through L x L Gram matrices (as vidlankd_jax.losses.nst_loss)."""
  s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
  gram_s, gram_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
  hidden, length = student.shape[2], student.shape[1]
  return (gram_s * (gram_s - 2 * gram_t)).sum() / hidden**2 / length


class TorchDistillation(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.student = transformers.BertForMaskedLM(hf_config(config.model))
    h, ht = config.model.hidden_size, config.teacher.model.hidden_size
    self.head = nn.Sequential(
        nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12), nn.Linear(h, ht)
    )
    self.teacher = transformers.BertModel(hf_config(config.teacher.model), add_pooling_layer=False)
    self.teacher.eval().requires_grad_(False)

  def loss(self, batch):
    with torch.no_grad():
      targets = F.normalize(
          self.teacher(batch["input_ids"], batch["attention_mask"]).last_hidden_state, dim=-1
      )
    hidden = self.student.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    mlm = masked_lm_loss(self.student.cls, hidden, batch)
    return mlm + nst(F.normalize(self.head(hidden), dim=-1), targets)


class TorchVideoTower(nn.Module):

  def __init__(self, video_cfg):
    super().__init__()
    cfg = hf_config(video_cfg)
    h = video_cfg.hidden_size
    self.project = nn.Sequential(
        nn.Linear(video_cfg.input_dim, video_cfg.projection_dim),
        nn.Linear(video_cfg.projection_dim, h),
    )
    self.position = nn.Embedding(video_cfg.max_steps, h)
    self.token_type = nn.Embedding(2, h)
    self.norm = nn.LayerNorm(h, eps=1e-12)
    self.dropout = nn.Dropout(video_cfg.hidden_dropout)
    self.encoder = transformers.models.bert.modeling_bert.BertEncoder(cfg)
    self.pooler = nn.Linear(h, h)
    self.mlp = nn.Sequential(
        nn.Linear(h, h), nn.ReLU(), nn.Dropout(video_cfg.clip_mlp_dropout), nn.Linear(h, h)
    )

  def forward(self, features, mask):
    steps = torch.arange(features.shape[1])
    x = self.project(features) + self.position(steps)[None] + self.token_type.weight[0]
    x = self.dropout(self.norm(x))
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    hidden = self.encoder(x, attention_mask=bias).last_hidden_state
    return F.normalize(self.mlp(torch.tanh(self.pooler(hidden[:, 0]))), dim=-1)


class TorchTeacher(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.language = transformers.BertForMaskedLM(hf_config(config.model))
    self.video = TorchVideoTower(config.video)

  def loss(self, batch):
    hidden = self.language.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    mlm = masked_lm_loss(self.language.cls, hidden, batch)
    tokens = F.normalize(hidden, dim=-1)
    clip = self.video(batch["video_features"], batch["video_mask"])
    own = torch.einsum("blh,bh->bl", tokens, clip)
    other = torch.einsum("blh,bh->bl", tokens, clip.roll(clip.shape[0] // 2, 0))
    mask = batch["attention_mask"].float()
    contrast = ((1.0 - own + other).clamp(min=0) * mask).sum() / mask.sum()
    return mlm + contrast


def torch_step_fn(model, lr=2e-4):
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.01, foreach=True)

  def step(batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    return loss

  return step


# ---------------------------------------------------------------------------------- ours


def our_distill_step(args):
  config = configlib.load("distill", f"size={args.size},objectives=nst")
  config.dtype = "float32"
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq_len
  config.data.max_predictions = args.max_predictions
  setup, step = setup_and_step(config, sharding.single_device_mesh())
  return config, setup.state, step


def our_teacher_step(args):
  config = configlib.load("teacher", f"size={args.size}")
  config.dtype = "float32"
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq_len
  config.data.max_predictions = args.max_predictions
  config.video.max_steps = args.video_steps
  mesh = sharding.single_device_mesh()
  setup = teacher_train.init(config, mesh)
  return config, setup.state, loop.jit_train_step(setup.train_step, setup.state, mesh)


def video_batch(config, batch: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, t, d = config.train.batch_size, config.video.max_steps, config.video.input_dim
  features = rng.standard_normal((b, t, d)).astype(np.float32)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  mask = np.ones((b, t), np.int32)
  mask[b // 2 :, t // 2 :] = 0  # half the clips half as long
  return {**batch, "video_features": features, "video_mask": mask}


# ------------------------------------------------------------------------------ timing


def compare(name: str, ours_step, state, torch_step, batch, args) -> dict:
  """Interleaved rounds of both steps; medians of the per-round mean step times."""
  jax_batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  torch_batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  start = time.perf_counter()
  state, metrics = ours_step(state, jax_batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  torch_step(torch_batch)  # PyTorch's warm-up (allocator, kernels)
  ours, theirs = [], []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = ours_step(state, jax_batch)
    jax.block_until_ready(metrics)
    ours.append((time.perf_counter() - start) / args.steps)
    start = time.perf_counter()
    for _ in range(args.steps):
      torch_step(torch_batch)
    theirs.append((time.perf_counter() - start) / args.steps)
  result = {
      "step": name,
      "ours_seconds": statistics.median(ours),
      "pytorch_seconds": statistics.median(theirs),
      "ours_compile_and_first_step_seconds": compile_seconds,
  }
  result["pytorch_over_ours"] = result["pytorch_seconds"] / result["ours_seconds"]
  return result


def main(args) -> list[dict]:
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  results = []
  for which in args.which.split(","):
    if which == "distill":
      config, state, step = our_distill_step(args)
      batch = random_batch(config)
      theirs = torch_step_fn(TorchDistillation(config))
    elif which == "teacher":
      config, state, step = our_teacher_step(args)
      batch = video_batch(config, random_batch(config))
      theirs = torch_step_fn(TorchTeacher(config), lr=5e-5)
    else:
      raise SystemExit(f"error: --which {which!r}: expected distill and/or teacher")
    batch = {k: v for k, v in batch.items() if k != "valid"}
    results.append(compare(which, step, state, theirs, batch, args))
    print(
        f"{which:>8}: ours {results[-1]['ours_seconds']:.3f} s, PyTorch "
        f"{results[-1]['pytorch_seconds']:.3f} s, PyTorch / ours "
        f"{results[-1]['pytorch_over_ours']:.2f}",
        flush=True,
    )
  print(
      json.dumps(
          {
              "size": args.size,
              "batch": args.batch,
              "seq_len": args.seq_len,
              "video_steps": args.video_steps,
              "threads": args.threads,
              "torch": torch.__version__,
              "jax": jax.__version__,
              "results": results,
          }
      )
  )
  return results


if __name__ == "__main__":
  main(ARGS)
