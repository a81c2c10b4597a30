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
import sys

from vidlankd_jax import errors, quiet


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
  from vidlankd_jax import runs
  from vidlankd_jax.data import vocab as vocab_lib
  from vidlankd_jax.interop import hf_bert

  model, run_config = runs.load_language_model(workdir, step, num_heads)
  vocab_file = (
      vocab_file or run_config.get("data", {}).get("vocab_file") or vocab_lib.default_vocab_file()
  )
  size = len(vocab_lib.read_vocab_file(vocab_file))
  if size > model.config.vocab_size:
    raise errors.DataError(
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
  quiet.quiet_libraries()
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
  sys.exit(errors.run_tool(main))
