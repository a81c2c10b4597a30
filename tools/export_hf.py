"""Writes the language BERT of a student or teacher checkpoint as a Hugging Face directory.

  python tools/export_hf.py --workdir runs/student --output_dir hf/student
  python tools/export_hf.py --workdir runs/teacher --output_dir hf/teacher_encoder --encoder_only

The directory holds `config.json`, `model.safetensors` and `vocab.txt` (the run's vocabulary):

* by default a `BertForMaskedLM` (encoder + MLM head, no pooler, which MLM never trains), which
  transformers' `BertForMaskedLM` loads with no missing or unexpected weight;
* with `--encoder_only` a `BertModel` (encoder + pooler), which `BertModel` loads likewise.

(transformers 5 reports the MLM head as unexpected when `BertModel` reads a `BertForMaskedLM`
file, and the pooler as missing: hence one directory per architecture.)
The number of attention heads and LayerNorm epsilon come from the run's `config.json`; the other
sizes from the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flax import nnx, traverse_util

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import sharding
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.interop import hf_bert
from vidlankd_jax.models.bert import BertConfig, BertForMaskedLM
from vidlankd_jax.train import finetune


def read_run_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_language_model(
    workdir: str, step: int | None = None, num_heads: int = 0
) -> tuple[BertForMaskedLM, dict]:
  """The run's language BERT with its MLM head (one device), and the run's config.json dict."""
  manager_dir, run_dir = finetune.checkpoint_dirs(workdir)
  if not os.path.isdir(manager_dir):
    raise FileNotFoundError(
        f"{workdir}: no checkpoints folder (is it a teacher or student workdir?)"
    )
  params = ckpt_lib.restore_params_numpy(manager_dir, step)
  language = params.get("language", {})
  if "bert" not in language or "mlm" not in language:
    raise ValueError(
        f"{manager_dir}: the checkpoint's params have no language/bert and language/mlm "
        f"(top-level keys: {sorted(params)}); only teacher and student runs carry both"
    )
  flat = traverse_util.flatten_dict(language, sep="/")
  bert = {k[len("bert/") :]: v for k, v in flat.items() if k.startswith("bert/")}
  arch = finetune.architecture_from_params(bert, manager_dir)
  saved_heads = finetune.heads_from_saved_config(run_dir, arch)
  if num_heads and saved_heads and num_heads != saved_heads:
    raise ValueError(f"--num_heads {num_heads} differs from {run_dir}/config.json's {saved_heads}")
  arch["num_heads"] = num_heads or saved_heads
  if not arch["num_heads"]:
    raise ValueError(f"{run_dir}/config.json does not describe these weights: pass --num_heads")
  run_config = read_run_config(run_dir)
  eps = run_config.get("model", {}).get("layer_norm_eps", BertConfig.layer_norm_eps)
  cfg = BertConfig(**arch, layer_norm_eps=eps)
  model = sharding.create_sharded(
      lambda: BertForMaskedLM(cfg, rngs=nnx.Rngs(0)),
      sharding.single_device_mesh(),
      sharding.DEFAULT_RULES,
  )
  finetune.load_encoder(model, finetune.InitialEncoder(workdir, params=flat))
  return model, run_config


def export(
    workdir: str,
    output_dir: str,
    *,
    step: int | None = None,
    vocab_file: str = "",
    encoder_only: bool = False,
    num_heads: int = 0,
) -> str:
  """Writes the Hugging Face directory; returns the vocabulary file it copied."""
  model, run_config = load_language_model(workdir, step, num_heads)
  vocab_file = (
      vocab_file or run_config.get("data", {}).get("vocab_file") or vocab_lib.default_vocab_file()
  )
  size = len(vocab_lib.read_vocab_file(vocab_file))
  if size > model.config.vocab_size:
    raise ValueError(
        f"vocabulary {vocab_file} has {size} entries, the model's embeddings "
        f"{model.config.vocab_size}: not the vocabulary this model was trained with"
    )
  hf_bert.save_pretrained(model.bert if encoder_only else model, output_dir, vocab_file)
  return vocab_file


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--workdir", required=True, help="teacher or student workdir (or its checkpoints/)"
  )
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--step", type=int, default=-1, help="checkpoint step; -1: the latest")
  parser.add_argument("--vocab_file", default="", help="default: the run's, else bert-base-uncased")
  parser.add_argument("--encoder_only", action="store_true", help="write a BertModel (with pooler)")
  parser.add_argument("--num_heads", type=int, default=0, help="only if the run has no config.json")
  args = parser.parse_args(argv)
  vocab = export(
      args.workdir,
      args.output_dir,
      step=None if args.step < 0 else args.step,
      vocab_file=args.vocab_file,
      encoder_only=args.encoder_only,
      num_heads=args.num_heads,
  )
  kind = "BertModel" if args.encoder_only else "BertForMaskedLM"
  print(f"wrote {kind} from {args.workdir} to {args.output_dir} (vocabulary {vocab})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
