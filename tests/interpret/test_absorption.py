import pytest
import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.interpret.absorption import absorption, first_letters, letter_probes, train_probe


class LinearReLU(Dictionary):
    """codes = relu(x E), x̂ = codes D: a hand-built SAE."""

    kind = "linear_relu_for_tests"

    def __init__(self, encoder, decoder):
        self.encoder, self.decoder = encoder, decoder

    @property
    def directions(self):
        return self.decoder

    def encode_sparse(self, x):
        codes = torch.relu(x @ self.encoder)
        return codes, torch.arange(codes.shape[1]).expand(x.shape[0], -1)

    def tensors(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def config(self):
        return {}

    @classmethod
    def from_saved(cls, tensors, config):
        return cls(tensors["encoder"], tensors["decoder"])


def test_first_letters_of_word_tokens():
    tokens = [" apple", "▁Banana", "Ġcat", "dog", " 42", " é", "\n"]
    assert first_letters(tokens) == ["a", "b", "c", None, None, None, None]


def test_planted_absorption_rate_is_recovered():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    f_a, f_b, h = basis[0], basis[1], basis[2]
    n_a, n_b, absorbed = 200, 200, 60  # 60 of the 200 'a' words carry the token-specific direction h
    x = torch.cat([5 * f_a.expand(n_a, -1), 5 * f_b.expand(n_b, -1)]) + 0.1 * torch.randn(n_a + n_b, 16, generator=g)
    x[:absorbed] += 10 * h
    letters = ["a"] * n_a + ["b"] * n_b
    # unit 0 is the 'a' latent but h switches it off; unit 2 fires on h and its decoder leans towards f_a
    encoder = torch.stack([f_a - 10 * h, f_b, h], 1)
    decoder = torch.stack([f_a, f_b, torch.nn.functional.normalize(0.5 * f_a + h, dim=0)])
    out = absorption(LinearReLU(encoder, decoder), x, letters)
    a, b = out["letters"]["a"], out["letters"]["b"]
    assert a["main_units"] == [0] and b["main_units"] == [1]
    assert a["true_positives"] == n_a and a["absorbed"] == absorbed and a["rate"] == pytest.approx(0.3)
    assert b["absorbed"] == 0 and out["rate"] == pytest.approx(absorbed / (n_a + n_b))
    # a stricter cosine threshold than the absorber's (0.447) finds no absorption
    assert absorption(LinearReLU(encoder, decoder), x, letters, cos_threshold=0.5)["letters"]["a"]["absorbed"] == 0


def test_probe_separates_its_letter():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g) + 100  # far from the origin, like activations
    y = x[:, 3] > 100.2
    d, c = train_probe(x, y)
    assert ((x @ d + c > 0) == y).float().mean() > 0.95 and d.norm() == pytest.approx(1)


def test_probes_trained_together_equal_probes_trained_one_by_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g) + 50
    letters = [("a", "b", "c", None)[int(i)] for i in (x[:, 0] * 10).remainder(4).long()]
    letters[:25] = ["z"] * 10 + ["y"] * 15  # y has too few tokens (< 20 with the rest)
    together = letter_probes(x, letters)
    assert "y" not in together and {"a", "b", "c"} <= set(together)
    for letter, (direction, offset) in together.items():
        alone, alone_offset = train_probe(x, torch.tensor([c == letter for c in letters]))
        assert torch.allclose(direction, alone, atol=1e-4) and offset == pytest.approx(alone_offset, abs=1e-3)
