"""Distillation losses of vidlankd_jax against straightforward forms of the reference code.

Each loss of ``vidlankd_jax.losses`` (jitted, vectorised) is timed beside a direct form written
the way the released PyTorch code computes it, and run the way PyTorch runs it: eagerly, one
operation at a time, every intermediate materialised, loops in Python:

* NST: a loop over the sequences; per sequence the H x H x L product of the polynomial kernel
  (``(fm1.unsqueeze(1) * fm2.unsqueeze(2)).sum(-1) ** 2``), twice.
* NT-Xent: a loop over the positions; per position the 2B x 2B cosine similarity by
  broadcasting (a [2B, 2B, H] product), boolean selection of the negatives, cross-entropy.
* hidden MSE, soft-label KD, CRD (memory bank): the reference's tensor expressions.

Memory: ``peak_mib`` is the peak of live intermediate buffers when every operation's output is
materialised and freed after its last use (a liveness walk over the traced program, inputs
excluded). It is the eager reference's working set, and an upper bound for the compiled fast
form, whose XLA temp size (``memory_analysis().temp_size_in_bytes``; the CPU backend does not
count buffers inside its fusions) is listed beside it. The memory ratio compares the two peaks.

    python bench/kd_losses.py               # B 32, L 128, H 768 (the paper's shapes)
    python bench/kd_losses.py --quick       # B 8, L 32, H 128

The last line of output is one JSON object with every figure.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidlankd_jax import losses

# --------------------------------------------------------------------------- reference forms


def reference_nst(student, teacher):
  """The released NST: loop over sequences, H x H kernels through an H x H x L product."""

  def poly_kernel(fm1, fm2):  # fm [1, H, L]
    product = fm1[:, None, :, :] * fm2[:, :, None, :]  # [1, H, H, L]
    return jnp.sum(product, axis=-1) ** 2

  total = jnp.zeros((), jnp.float32)
  for b in range(student.shape[0]):
    fm_s = losses.l2_normalize(student[b : b + 1].transpose(0, 2, 1), axis=2)
    fm_t = losses.l2_normalize(teacher[b : b + 1].transpose(0, 2, 1), axis=2)
    total += jnp.mean(poly_kernel(fm_s, fm_s)) - 2 * jnp.mean(poly_kernel(fm_s, fm_t))
  return total / student.shape[1]


def _released_negative_mask(batch):
  keep = np.ones((2 * batch, 2 * batch), bool)
  np.fill_diagonal(keep, False)
  keep[np.arange(batch), batch + np.arange(batch)] = False
  keep[batch + np.arange(batch), np.arange(batch)] = False
  return keep


def reference_nt_xent(student, teacher, temperature=1.0):
  """The released in-batch contrastive KD, without its extra 1/(2B): a loop over positions."""
  batch, seq_len = student.shape[0], student.shape[1]
  keep = _released_negative_mask(batch)
  total = jnp.zeros((), jnp.float32)
  for t in range(seq_len):
    z = jnp.concatenate([student[:, t], teacher[:, t]], axis=0)  # [2B, H]
    product = z[:, None, :] * z[None, :, :]  # [2B, 2B, H]
    norms = jnp.linalg.norm(z, axis=-1)
    sim = jnp.sum(product, axis=-1) / jnp.maximum(norms[:, None] * norms[None, :], 1e-8)
    sim = sim / temperature
    positives = jnp.concatenate([jnp.diagonal(sim, batch), jnp.diagonal(sim, -batch)])
    negatives = sim[keep].reshape(2 * batch, -1)
    logits = jnp.concatenate([positives[:, None], negatives], axis=1)
    total += jnp.mean(-jax.nn.log_softmax(logits, axis=-1)[:, 0])
  return total / seq_len


def reference_hidden_mse(student, teacher, mask):
  """``(square(pred - target) * mask[..., None]).sum() / mask.sum()``."""
  return jnp.sum(jnp.square(student - teacher) * mask[..., None]) / jnp.sum(mask)


def reference_soft_label_kd(student_logits, teacher_logits, temperature, weights):
  """softmax / log_softmax over the vocabulary, KL per position, weighted mean, times T^2."""
  p = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(p * (jnp.log(p) - log_q), axis=-1)
  return temperature**2 * jnp.sum(kl * weights) / jnp.sum(weights)


def reference_crd(
    student_emb,
    teacher_emb,
    indices,
    memory,
    key,
    num_negatives,
    temperature=0.07,
    momentum=0.5,
    eps=1e-7,
):
  """ContrastMemory + two ContrastLoss terms as released (normalisers in their own slots)."""
  num_examples, dim = memory.student_memory.shape
  batch = student_emb.shape[0]
  negatives = jax.random.randint(key, (batch, num_negatives), 0, num_examples)
  ids = jnp.concatenate([indices[:, None], negatives], axis=1)  # column 0: the positive
  weight_v1 = memory.student_memory[ids.reshape(-1)].reshape(batch, num_negatives + 1, dim)
  out_v2 = jnp.exp(jnp.matmul(weight_v1, teacher_emb[:, :, None])[..., 0] / temperature)
  weight_v2 = memory.teacher_memory[ids.reshape(-1)].reshape(batch, num_negatives + 1, dim)
  out_v1 = jnp.exp(jnp.matmul(weight_v2, student_emb[:, :, None])[..., 0] / temperature)
  z_v1 = jnp.where(memory.z_student > 0, memory.z_student, out_v1.mean() * num_examples)
  z_v2 = jnp.where(memory.z_teacher > 0, memory.z_teacher, out_v2.mean() * num_examples)
  noise = num_negatives / num_examples

  def contrast_loss(x):
    log_d1 = jnp.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = jnp.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / batch

  loss = contrast_loss(out_v1 / z_v1) + contrast_loss(out_v2 / z_v2)

  def update(mem, emb):
    rows = mem[indices] * momentum + emb * (1 - momentum)
    return mem.at[indices].set(rows / jnp.linalg.norm(rows, axis=1, keepdims=True))

  new_memory = losses.CRDMemory(
      update(memory.student_memory, student_emb),
      update(memory.teacher_memory, teacher_emb),
      z_v1,
      z_v2,
  )
  return loss, new_memory


# --------------------------------------------------------------------------- measurement


def _first_scalar(out):
  return out[0] if isinstance(out, tuple) else out


def _nbytes(var):
  aval = var.aval
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
    return int(np.prod(aval.shape, dtype=np.int64)) * 8  # two uint32 words per key
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _is_literal(var):
  return hasattr(var, "val")


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for item in param if isinstance(param, (tuple, list)) else (param,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(getattr(item, "jaxpr", None), "eqns"):
        yield item.jaxpr


# Operations that PyTorch performs as views (and XLA as no-ops or bitcasts): their outputs share
# the input's buffer.
_VIEWS = frozenset({"stop_gradient", "reshape", "squeeze", "expand_dims", "transpose"})


def _peak_live_bytes(jaxpr):
  """Peak bytes of intermediates alive at once when every equation's outputs are materialised
  (views share their input's buffer) and a buffer is freed after the last use of every value
  in it; the jaxpr's own inputs are not counted."""
  last_use = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for var in eqn.invars:
      if not _is_literal(var):
        last_use[var] = i
  for var in jaxpr.outvars:
    if not _is_literal(var):
      last_use[var] = len(jaxpr.eqns)
  owner, readers = {}, {}  # value -> the value that allocated its buffer; buffer -> live values
  live = peak = 0

  def release(var):
    nonlocal live
    buffer = owner.get(var)
    if buffer is None:  # an input of the jaxpr
      return
    readers[buffer] -= 1
    if readers[buffer] == 0:
      live -= _nbytes(buffer)

  for i, eqn in enumerate(jaxpr.eqns):
    # A call's own peak includes its outputs, which are counted below only once it returns.
    inner = max((_peak_live_bytes(sub) for sub in _sub_jaxprs(eqn)), default=0)
    peak = max(peak, live + inner)
    source = eqn.invars[0] if eqn.invars else None
    if eqn.primitive.name in _VIEWS and not _is_literal(source):
      if source in owner:  # a view of an input stays uncounted, like the input
        owner[eqn.outvars[0]] = owner[source]
        readers[owner[source]] += 1
    else:
      for var in eqn.outvars:
        owner[var], readers[var] = var, 1
        live += _nbytes(var)
    peak = max(peak, live)
    for var in [v for v in eqn.outvars if v not in last_use]:  # never read
      release(var)
    for var in {v for v in eqn.invars if not _is_literal(v)}:
      if last_use[var] == i:
        release(var)
  return peak


def peak_bytes(fn, args):
  return _peak_live_bytes(jax.make_jaxpr(fn)(*args).jaxpr)


def _time(run, repeats):
  """(median seconds over ``repeats`` runs, the last run's output)."""
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def compare(name, fast, reference, args, repeats, reference_repeats, warm_args=None):
  """Time the compiled fast form over ``repeats`` runs and the eager reference over
  ``reference_repeats``, after a warm-up on ``warm_args`` (inputs with the reference's
  per-iteration shapes, so that each eager operation is compiled before timing)."""
  compiled = jax.jit(fast).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  fast_s, fast_out = _time(lambda: compiled(*args), repeats)
  jax.block_until_ready(reference(*(warm_args or args)))
  ref_s, ref_out = _time(lambda: reference(*args), reference_repeats)
  fast_value, ref_value = float(_first_scalar(fast_out)), float(_first_scalar(ref_out))
  fast_peak, ref_peak = peak_bytes(fast, args), peak_bytes(reference, args)
  row = {
      "fast_ms": round(fast_s * 1e3, 3),
      "reference_ms": round(ref_s * 1e3, 3),
      "speedup": round(ref_s / fast_s, 2),
      "fast_peak_mib": round(fast_peak / 2**20, 3),
      "reference_peak_mib": round(ref_peak / 2**20, 3),
      "memory_ratio": round(ref_peak / fast_peak, 2),
      "fast_xla_temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 3),
      "value": fast_value,
      "abs_diff": abs(fast_value - ref_value),
  }
  print(
      f"{name:10s} fast {row['fast_ms']:10.2f} ms {row['fast_peak_mib']:9.2f} MiB | "
      f"reference {row['reference_ms']:10.2f} ms {row['reference_peak_mib']:9.2f} MiB | "
      f"x{row['speedup']:.1f} time, x{row['memory_ratio']:.1f} memory | "
      f"|diff| {row['abs_diff']:.2e}",
      file=sys.stderr,
      flush=True,
  )
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument(
      "--vocab",
      type=int,
      default=8192,
      help="vocabulary of the soft-label KD logits (30522 for BERT's)",
  )
  parser.add_argument("--crd-examples", type=int, default=65536, help="CRD memory size N")
  parser.add_argument("--crd-dim", type=int, default=128, help="CRD projection size D")
  parser.add_argument("--crd-negatives", type=int, default=4096, help="CRD negatives K")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs of each fast form")
  parser.add_argument(
      "--reference-repeats", type=int, default=1, help="timed runs of each eager reference form"
  )
  parser.add_argument("--quick", action="store_true", help="B 8, L 32, H 128, V 2048")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.seq_len, args.hidden, args.vocab = 8, 32, 128, 2048
    args.crd_examples, args.crd_negatives = 4096, 512

  b, l, h = args.batch, args.seq_len, args.hidden
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  student = jax.random.normal(keys[0], (b, l, h), jnp.float32)
  teacher = losses.l2_normalize(jax.random.normal(keys[1], (b, l, h), jnp.float32))
  mask = jnp.ones((b, l), jnp.float32)
  student_logits = jax.random.normal(keys[2], (b, l, args.vocab), jnp.float32)
  teacher_logits = jax.random.normal(keys[3], (b, l, args.vocab), jnp.float32)
  student_emb = losses.l2_normalize(jax.random.normal(keys[4], (b, args.crd_dim)))
  teacher_emb = losses.l2_normalize(jax.random.normal(keys[5], (b, args.crd_dim)))
  indices = jax.random.permutation(keys[6], args.crd_examples)[:b]
  memory = losses.init_crd_memory(keys[7], args.crd_examples, args.crd_dim)
  crd_key = jax.random.PRNGKey(1)
  negatives = args.crd_negatives

  print(
      f"device {jax.devices()[0].device_kind}, B {b} L {l} H {h}, vocab {args.vocab}, "
      f"CRD N {args.crd_examples} D {args.crd_dim} K {negatives}",
      file=sys.stderr,
  )
  repeats = (args.repeats, args.reference_repeats)
  results = {
      "nst": compare(
          "nst",
          losses.nst_loss,
          reference_nst,
          (student, teacher),
          *repeats,
          warm_args=(student[:1], teacher[:1]),
      ),
      "nt_xent": compare(
          "nt_xent",
          losses.nt_xent_loss,
          reference_nt_xent,
          (student, teacher),
          *repeats,
          warm_args=(student[:, :1], teacher[:, :1]),
      ),
      "hidden_mse": compare(
          "hidden_mse",
          losses.hidden_mse_loss,
          reference_hidden_mse,
          (student, teacher, mask),
          *repeats,
      ),
      "soft_label_kd": compare(
          "soft_kd",
          lambda s, t, w: losses.soft_label_kd_loss(s, t, 2.0, w),
          lambda s, t, w: reference_soft_label_kd(s, t, 2.0, w),
          (student_logits, teacher_logits, mask),
          *repeats,
      ),
      "crd": compare(
          "crd",
          lambda s, t, i, m, k: losses.crd_loss(s, t, i, m, k, num_negatives=negatives),
          lambda s, t, i, m, k: reference_crd(s, t, i, m, k, negatives),
          (student_emb, teacher_emb, indices, memory, crd_key),
          *repeats,
      ),
  }
  print(
      json.dumps(
          {
              "device": jax.devices()[0].device_kind,
              "batch": b,
              "seq_len": l,
              "hidden": h,
              "vocab": args.vocab,
              "crd_examples": args.crd_examples,
              "crd_dim": args.crd_dim,
              "crd_negatives": negatives,
              "repeats": args.repeats,
              "reference_repeats": args.reference_repeats,
              "reference_mode": "eager",
              "losses": results,
          }
      )
  )


if __name__ == "__main__":
  main()
