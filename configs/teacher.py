"""Teacher pretraining: BERT language encoder + video encoder on video-text pairs.

  python -m vidlankd_jax.main --config=configs/teacher.py:size=small --workdir=runs/teacher
  python -m vidlankd_jax.main --config=configs/teacher.py:size=tiny \
      --config.train.steps=10 --config.data.data_dir=data/howto100m --workdir=runs/t

  python -m vidlankd_jax.main --config=configs/teacher.py:size=tiny,data=synthetic --workdir=runs/t

`--config.train.profile_steps=10:15` (any stage) writes a jax.profiler trace of steps 11-15 to
<workdir>/profile for TensorBoard's profile plugin (configlib.base_config; docs/scale.md).

`size` sets the language encoder (tiny|mini|small|base|large); `video_size` the video encoder's
transformer (default: the same). Defaults follow the released code: lr 5e-5, no warmup, linear
decay, clipping 1.0, margin 1.0, MLM weight 1.0. `recipe=released` (default `paper`) runs the
released teacher as it was trained where that differs from the paper: the video tower never
trained, its embeddings added twice, a step masked when its last feature is 0, and the linear
decay planned over ten times the run (the released checkpoint-epoch0019 of 200 nominal epochs
ends with 90% of the peak learning rate); docs/recipe.md lists both.
"""

from vidlankd_jax import configlib as common


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", video_size="", data="", recipe="paper")
  released = common.check_recipe(arg.recipe) == "released"
  config = common.base_config(stage="teacher", size=arg.size)

  config.video = common.bert_config(arg.video_size or arg.size)
  config.video.input_dim = 4096  # 2D (2048) + 3D (2048) features per second; from the data
  config.video.projection_dim = 1024  # Linear 4096 -> 1024 -> hidden, no nonlinearity between
  config.video.max_steps = 384
  config.video.clip_mlp_dropout = 0.3
  # 2: position and token-type embeddings added twice, each followed by the LayerNorm, as the
  # released code does (tools/import_vidlankd.py sets it for imported checkpoints).
  config.video.embedding_passes = 1
  # The released code never trains the video tower (no-grad, not in the optimiser); True
  # reproduces that. The paper trains both towers jointly.
  config.video.frozen = False
  # Which video steps are attended to: "steps" (the clip's stored steps) or "last_channel"
  # (also not a step whose last feature is 0, as the released training loop).
  config.video.mask_rule = "steps"

  config.loss = dict(
      contrastive="paired_hinge",  # paired_hinge | batchwise_hinge | info_nce
      margin=1.0,
      temperature=0.07,  # info_nce only
      contrastive_weight=1.0,
      mlm_weight=1.0,
  )

  config.data.task = "howto100m_video_text"
  # 126 tokens with [CLS] and [SEP], as the released loader (max_length=126 with specials).
  config.data.seq_len = 126
  # Batches go to the device cut to their longest clip, rounded up to this many steps (0: padded
  # to video.max_steps): HowTo100M's ~126-word clips last far less than 384 s.
  config.data.video_bucket = 64
  # The released teacher's sampler shuffles (DistributedSampler(shuffle=True)).
  config.data.shuffle = True
  # data=synthetic: generate a small corpus in HowTo100M's layout (features carry the captions'
  # concepts) and convert it with the real converter before training: the embedded default.
  config.data.synthetic = arg.data == "synthetic"
  if config.data.synthetic:
    config.data.data_dir = "runs/synthetic_data"

  config.train.batch_size = 64 if arg.size == "base" else 128
  config.train.steps = 100_000
  config.optimizer = common.optimizer_config(learning_rate=5e-5, warmup_steps=0)

  if released:
    config.video.frozen = True
    config.video.embedding_passes = 2
    config.video.mask_rule = "last_channel"
    config.optimizer.decay_horizon = 10.0

  config.eval.retrieval_clips = 1000  # held-out clips ranked per query sentence
  config.checkpoint.best_metric = "eval/recall@1"
  config.checkpoint.best_mode = "max"

  if arg.size == "tiny":
    common.shrink_to_tiny(config)
    config.video.max_steps = 16
    config.data.video_bucket = 0  # one shape: one compilation in tests and demos
    config.video.projection_dim = 64
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    # At this size and budget the paired hinge and full-weight MLM leave the tiny teacher ranking
    # held-out clips at chance; in-batch InfoNCE with a light MLM term learns the generated
    # corpus in a few hundred steps (held-out recall@1 well above chance).
    config.loss.contrastive = "info_nce"
    config.loss.mlm_weight = 0.1
    config.train.steps = 400
  config.lock()
  return config
