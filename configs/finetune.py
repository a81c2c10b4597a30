"""Fine-tuning on one downstream benchmark, several seeds per run.

  python -m vidlankd_jax.main --config=configs/finetune.py:task=sst2,init=runs/student \
      --config.seeds=1,2,3 --workdir=runs/finetune/sst2
  python -m vidlankd_jax.main --config=configs/finetune.py:task=squad_v1,init=hf:/models/bert-base \
      --config.data.data_dir=~/tensorflow_datasets --workdir=runs/finetune/squad_v1
  python -m vidlankd_jax.main --config=configs/finetune.py:task=tracie,size=tiny \
      --config.data.tracie_dir=data/tracie --workdir=runs/finetune/tracie
  --config.train.profile_steps=10:15  # trace of steps 11-15 in <workdir>/seed_<s>/profile

`task` is a registered benchmark (glue_sst2, squad_v1, swag, piqa, tracie_iid, ...) or a GLUE
short name (sst2, mnli, ...). `init` is `scratch`, `hf:<dir>` or a teacher/student workdir.
`size` is a model size, or `auto` (the default unless `init=scratch`): the size of the initial
weights. `size=tiny` shrinks everything for tests and CPU demos. Defaults follow the paper's
protocol and the released fine-tuning scripts (docs/recipe.md, "Fine-tuning"); a benchmark added
with its own registration gets an entry in TASK_DEFAULTS (or the generic defaults).
`recipe=released` (default `paper`) runs the released launches where they differ: GLUE on 4 GPUs
with DataParallel (a global batch of 128), SQuAD v2.0 without --version_2_with_negative (never
predicts "no answer"); docs/recipe.md.
"""

from vidlankd_jax import configlib as common

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax")
TASK_ALIASES = {
    **{name: f"glue_{name}" for name in GLUE},
    "squad": "squad_v1",
    "tracie": "tracie_iid",
}

# Task name (or family, the part before the first "_") -> training defaults, from the released
# fine-tuning scripts (docs/recipe.md has every value beside the paper's and the script's).
# `seq_len` counts [CLS]/[SEP] (0: the benchmark's own default); `batch_size` is the global
# batch (the released scripts' per-GPU batch); `warmup_fraction` of the run's steps; `adam_eps`
# AdamW's epsilon; `primary_metric` is what comparison tables show.
GENERIC_DEFAULTS = dict(
    learning_rate=5e-5,
    epochs=3,
    batch_size=32,
    seq_len=0,
    weight_decay=0.0,
    warmup_fraction=0.1,
    adam_eps=1e-6,
    primary_metric="accuracy",
)
TASK_DEFAULTS = {
    # GLUE (run_glue_at_epoch.bash, run_glue.py): 3 epochs, lr 1e-4, batch 32, 126 tokens with
    # [CLS]/[SEP], warmup 10%, no weight decay, epsilon 1e-6.
    "glue": dict(learning_rate=1e-4, epochs=3, batch_size=32, seq_len=126),
    "glue_cola": dict(primary_metric="matthews_corr"),
    "glue_mrpc": dict(primary_metric="f1"),
    "glue_stsb": dict(primary_metric="pearson"),
    # SQuAD (run_squad_v1.bash / run_squad_v2.bash, run_squad.py): 2 epochs, batch 12, 384
    # tokens, doc stride 128; lr 3e-5 (v1.1) / 5e-5 (v2.0); no warmup, epsilon 1e-8.
    "squad": dict(
        epochs=2,
        batch_size=12,
        seq_len=384,
        doc_stride=128,
        warmup_fraction=0.0,
        adam_eps=1e-8,
        primary_metric="f1",
    ),
    "squad_v1": dict(learning_rate=3e-5),
    "squad_v2": dict(learning_rate=5e-5),
    # SWAG (run_swag.bash, transformers 3.3's Trainer): 4 endings, lr 5e-5, 3 epochs, 80 tokens
    # per choice row, batch 16 x 2 accumulation steps, no warmup, epsilon 1e-8.
    "swag": dict(
        learning_rate=5e-5,
        epochs=3,
        batch_size=32,
        seq_len=80,
        warmup_fraction=0.0,
        adam_eps=1e-8,
    ),
    # PIQA (run_piqa_at_epoch.bash, run_piqa.py): GLUE's settings, goal + solution rows.
    "piqa": dict(learning_rate=1e-4, epochs=3, batch_size=32, seq_len=126),
    # TRACIE: no released script. Story + hypothesis pairs (at most ~115 word pieces), GLUE's
    # length and optimiser; 1,174 (iid) training examples, hence more epochs, smaller batches.
    "tracie": dict(learning_rate=5e-5, epochs=10, batch_size=16, seq_len=126),
}


def task_defaults(task: str) -> dict:
  """Generic defaults, overridden by the task's family entry, then by the task's own entry."""
  out = dict(GENERIC_DEFAULTS)
  out.update(TASK_DEFAULTS.get(task.split("_")[0], {}))
  out.update(TASK_DEFAULTS.get(task, {}))
  return out


def get_config(arg=None):
  arg = common.parse_arg(arg, task="glue_sst2", size="", init="scratch", recipe="paper")
  released = common.check_recipe(arg.recipe) == "released"
  task = TASK_ALIASES.get(arg.task, arg.task)
  size = arg.size or ("base" if arg.init == "scratch" else "auto")
  defaults = task_defaults(task)

  config = common.base_config(stage="finetune", size="base" if size == "auto" else size)
  config.model.size = size
  config.init = dict(
      # "scratch", "hf:<Hugging Face BERT dir>", or a teacher/student workdir (or checkpoints/).
      source=arg.init,
      step=-1,  # checkpoint step to read; -1: the latest
  )
  # Comma-separated; each seed fine-tunes once (its own head, dropout and data order).
  config.seeds = "1,2,3"

  config.data.task = task
  config.data.seq_len = defaults["seq_len"]
  config.data.data_dir = ""  # TFDS data folder (GLUE, SQuAD, PIQA); "" uses TFDS's default
  config.data.swag_dir = ""  # train.csv / val.csv / test.csv of SWAG
  config.data.tracie_dir = ""  # the data/ folder of the TRACIE release (iid/, uniform-prior/)
  config.data.doc_stride = defaults.get("doc_stride", 128)
  config.data.max_query_length = 64
  # A module whose register_benchmarks(vocab, data_config) registers more benchmarks.
  config.data.benchmarks_module = ""

  config.train.batch_size = defaults["batch_size"]
  config.train.epochs = float(defaults["epochs"])
  config.train.steps = 0  # > 0 overrides epochs
  config.train.log_every = 50
  config.optimizer = common.optimizer_config(
      learning_rate=defaults["learning_rate"],
      warmup_steps=0,
      weight_decay=defaults["weight_decay"],
  )
  config.optimizer.eps = defaults["adam_eps"]
  # Sets warmup_steps from the run's length: int(fraction * steps), as the released scripts.
  config.optimizer.warmup_fraction = defaults["warmup_fraction"]

  config.eval.batch_size = 64
  config.eval.batches = 0  # 0: the whole split; n > 0: the first n batches only
  config.eval.every_steps = 0  # 0: evaluate once, at the end
  config.eval.primary_metric = defaults["primary_metric"]
  config.eval.n_best_size = 20  # span decoding
  config.eval.max_answer_length = 30
  config.eval.null_score_diff_threshold = 0.0  # SQuAD v2.0: answer "" above this null margin
  # MNLI only: also predict the GLUE diagnostics (seed_<s>/AX.tsv for the GLUE server) and, with
  # the labelled diagnostic-full.tsv from gluebenchmark.com, score R3 per category.
  config.eval.glue_ax = False
  config.eval.glue_diagnostics_file = ""

  if released:
    if task.startswith("glue_"):
      # run_glue_at_epoch.bash's 32 per GPU on the README's 4 GPUs (DataParallel).
      config.train.batch_size = 4 * defaults["batch_size"]
    if task == "squad_v2":
      # run_squad_v2.bash lacks --version_2_with_negative: the best span is always answered.
      config.eval.null_score_diff_threshold = float("inf")

  if size == "tiny":
    common.shrink_to_tiny(config)
    config.data.seq_len = 64 if config.data.task.startswith("squad") else 32
    config.data.max_query_length = 16
    config.data.doc_stride = 16
    config.train.steps = 0
    config.train.epochs = 1.0
    config.optimizer.learning_rate = 1e-3
    config.eval.batches = 0
    config.eval.every_steps = 0
  config.lock()
  return config
