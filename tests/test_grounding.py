"""Grounding: token-clip scores, retrieval listings, heatmaps, and tools/grounding.py end to end
(a tiny teacher and student run directory, held-out clips converted from a generated corpus)."""

import os

import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import runs as run_lib
from vidlankd_jax import sharding
from vidlankd_jax.data import synthetic
from vidlankd_jax.evaluation import grounding
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax import train_state as common
from vidlankd_jax.train import teacher as teacher_train

SENTENCES = ["slice the onion and fry it", "the dog runs after a red ball in the park"]


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------- pure parts


def test_token_clip_similarity_is_the_cosine():
  rng = np.random.default_rng(0)
  tokens, clips = rng.standard_normal((5, 8)), rng.standard_normal((3, 8))
  expected = unit(tokens) @ unit(clips).T
  np.testing.assert_allclose(grounding.token_clip_similarity(tokens, clips), expected, atol=1e-6)
  with pytest.raises(ValueError, match="same H"):
    grounding.token_clip_similarity(tokens, rng.standard_normal((3, 7)))


def test_retrieval_listing_ranks_clips_by_sentence_score():
  rng = np.random.default_rng(1)
  clips = unit(rng.standard_normal((6, 16)))
  # Sentence i is a noisy copy of clip 5 - i; padding tokens must not count.
  tokens = np.stack(
      [
          np.stack([clips[5 - i] + 0.05 * rng.standard_normal(16) for _ in range(4)])
          for i in range(3)
      ]
  )
  mask = np.ones((3, 4), np.int32)
  mask[1, 2:] = 0
  tokens[1, 2:] = -clips[4] * 10  # garbage under the padding
  sentences = grounding.sentence_vectors(tokens, mask)
  captions = [f"clip {j}" for j in range(6)]
  listing = grounding.retrieval_listing(sentences, clips, captions, k=3)
  assert [len(top) for top in listing] == [3, 3, 3]
  assert [top[0][0] for top in listing] == [5, 4, 3]
  assert listing[1][0][2] == "clip 4"
  for top, s in zip(listing, sentences):
    scores = [score for _, score, _ in top]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, [s @ clips[j] for j, _, _ in top], rtol=1e-5)
  with pytest.raises(ValueError, match="captions"):
    grounding.retrieval_listing(sentences, clips, captions[:5])
  with pytest.raises(ValueError, match="k=7"):
    grounding.retrieval_listing(sentences, clips, captions, k=7)


def test_heatmap_png_has_one_panel_per_entry(tmp_path):
  rng = np.random.default_rng(2)
  panels = [
      grounding.GroundingPanel(
          f"model {m}: sentence {s}",
          [f"w{i}" for i in range(4 + s)],
          ["a", "b", "c"],
          rng.uniform(-1, 1, (4 + s, 3)),
      )
      for s in range(2)
      for m in range(2)
  ]
  path = str(tmp_path / "sub" / "g.png")
  grounding.plot_grounding_heatmaps(panels, path)
  image = matplotlib.image.imread(path)
  width, height = grounding.figure_size(panels, 2)
  assert image.shape[:2] == (round(height * grounding.DPI), round(width * grounding.DPI))
  assert os.listdir(tmp_path / "sub") == ["g.png"]  # no temporary file left behind
  one_row = grounding.figure_size(panels[:2], 2)
  assert height > 1.5 * one_row[1]  # two sentences: two rows of panels
  with pytest.raises(ValueError, match="model 0: sentence 0"):
    bad = grounding.GroundingPanel(panels[0].title, panels[0].tokens, ["a"], panels[0].scores)
    grounding.plot_grounding_heatmaps([bad], path)


# ------------------------------------------------------------------------- the tool end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory, load_tool):
  """Tiny teacher and NST student workdirs (random weights) and held-out clips of a generated corpus."""
  root = tmp_path_factory.mktemp("grounding")
  data_dir = str(root / "data")
  synthetic.prepare_video_text(
      data_dir, num_videos=16, num_validation_videos=6, log=lambda *a: None
  )
  write_workdir = load_tool("import_vidlankd").write_workdir
  mesh = sharding.single_device_mesh()

  t_config = configlib.load("teacher", "size=tiny")
  teacher = sharding.create_sharded(
      lambda: Teacher.from_config(t_config, rngs=nnx.Rngs(1)), mesh, t_config.sharding_rules
  )
  _, params, _ = common.nnx_params(teacher)
  write_workdir(
      t_config, teacher, teacher_train.make_optimizer(t_config, params), str(root / "teacher")
  )

  s_config = configlib.load("distill", "size=tiny,objectives=nst")
  student = sharding.create_sharded(
      lambda: Student(
          BertConfig.from_config(s_config.model), ("nst",), teacher_hidden_size=64, rngs=nnx.Rngs(2)
      ),
      mesh,
      s_config.sharding_rules,
  )
  write_workdir(
      s_config, student, common.make_optimizer(s_config.optimizer, 10), str(root / "student")
  )
  return dict(root=root, data_dir=data_dir, teacher=teacher, student=student)


@pytest.fixture(scope="module")
def tool_output(runs, load_tool):
  sentences_file = runs["root"] / "sentences.txt"
  sentences_file.write_text(SENTENCES[1] + "\n\n")
  args = load_tool("grounding").parse_args(
      [
          "--teacher_workdir",
          str(runs["root"] / "teacher"),
          "--student_workdir",
          str(runs["root"] / "student"),
          "--data_dir",
          runs["data_dir"],
          "--sentence",
          SENTENCES[0],
          "--sentences_file",
          str(sentences_file),
          "--num_clips",
          "4",
          "--retrieval_clips",
          "10",
          "--k",
          "3",
          "--output_dir",
          str(runs["root"] / "out"),
      ]
  )
  return load_tool("grounding").run(args)


def test_tool_draws_one_panel_per_model_and_sentence(tool_output):
  panels = tool_output["panels"]
  assert [p.title.split(":")[0] for p in panels] == ["teacher", "student (nst head)"] * 2
  assert [p.title.split(": ", 1)[1] for p in panels[::2]] == SENTENCES
  assert panels[0].tokens[:2] == ["slice", "the"] and "[CLS]" not in panels[0].tokens
  for p in panels:
    assert p.scores.shape == (len(p.tokens), 4) and np.abs(p.scores).max() <= 1.0 + 1e-5
  assert np.abs(panels[0].scores - panels[1].scores).max() > 1e-3  # two models, two pictures
  image = matplotlib.image.imread(tool_output["picture"])
  width, height = grounding.figure_size(panels, 2)
  assert image.shape[:2] == (round(height * grounding.DPI), round(width * grounding.DPI))
  assert image.shape[1] > image.shape[0] / 2  # two columns: teacher | student


def test_tool_lists_k_clips_per_sentence_for_both_models(tool_output, runs):
  listings = tool_output["listings"]
  assert set(listings) == {"teacher", "student (nst head)"}
  for per_sentence in listings.values():
    assert [len(top) for top in per_sentence] == [3, 3]
    for top in per_sentence:
      assert len({j for j, _, _ in top}) == 3 and all(0 <= j < 10 for j, _, _ in top)
      assert [s for _, s, _ in top] == sorted((s for _, s, _ in top), reverse=True)
  # The heatmaps show the teacher's best clip for each sentence.
  assert {top[0][0] for top in listings["teacher"]} <= set(tool_output["shown"])
  markdown = (runs["root"] / "out" / "retrieval.md").read_text()
  for sentence in SENTENCES:
    assert f"## {sentence}" in markdown
  rows = [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert len(rows) == 2 * 2 * 3  # sentences x models x k
  assert listings["teacher"][0][0][2].replace("|", "/") in markdown


def test_a_student_without_the_head_is_an_error_naming_it(runs):
  with pytest.raises(ValueError, match=r"no \['crd'\] head.*objectives are nst"):
    run_lib.load_student(
        str(runs["root"] / "student"), sharding.single_device_mesh(), heads=("crd",)
    )
  with pytest.raises(ValueError, match="'crd'"):
    grounding.student_token_vectors(runs["student"], np.ones((1, 4)), np.ones((1, 4)), head="crd")
