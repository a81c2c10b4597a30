"""Science check: the teacher learns which clip a caption describes, and only from true pairs.

The session's two tiny teachers (`tests/support/tiny_teachers.py`: the configured tiny recipe run by the
real entry point, one on the generated corpus's true pairs and one on a copy whose training
captions were dealt out to the wrong seconds) are scored on the same held-out clips with their
true captions.
"""

import pytest

# Held-out recall@1 must exceed chance (1 / held-out clips) by this factor when trained on true
# pairs, and stay under it when trained on shuffled ones.
FAR_ABOVE_CHANCE = 5.0


@pytest.mark.slow
def test_teacher_retrieves_held_out_clips_far_above_chance_only_from_true_pairs(tiny_teachers):
  true, shuffled = tiny_teachers["true"]["eval"], tiny_teachers["shuffled"]["eval"]
  assert true["eval/retrieval_clips"] == shuffled["eval/retrieval_clips"]  # the same held-out set
  chance = true["eval/chance_recall@1"]
  figures = (
      f"text-to-video recall@1 over {int(true['eval/retrieval_clips'])} held-out clips "
      f"after {true['step']} steps (chance {chance:.4f}): true pairs "
      f"{true['eval/recall@1']:.4f} (median rank {true['eval/median_rank']:.0f}), shuffled "
      f"pairs {shuffled['eval/recall@1']:.4f} (median rank {shuffled['eval/median_rank']:.0f})"
  )
  print(figures)
  assert true["eval/recall@1"] >= FAR_ABOVE_CHANCE * chance, figures
  assert shuffled["eval/recall@1"] < FAR_ABOVE_CHANCE * chance, figures
  assert true["eval/median_rank"] < shuffled["eval/median_rank"], figures
