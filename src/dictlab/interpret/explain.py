"""Explanations and detection scores from a language model behind any OpenAI-compatible endpoint.

For a unit: the explainer sees its top contexts (the activating token marked «like this») and writes
a one-line explanation. Then, given only that explanation, it is shown a shuffled mix of held-out
contexts where the unit fires (its random samples, never shown before) and where it does not (random
contexts where it is inactive), and answers which ones fire. The detection score is the balanced
accuracy of that answer: 0.5 is chance, 1 is perfect.

The endpoint is POST {url}/chat/completions with {"model", "messages", "temperature": 0}; the key,
when needed, comes from DICTLAB_EXPLAINER_KEY. Plain urllib: no client library needed.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request

from dictlab.errors import DictlabError

EXPLAIN = ("Below are text excerpts from a dataset. In each, one token is marked «like this»: a unit of a "
           "language model's internal representation responds strongly there. In one short sentence, say what "
           "the unit responds to.\n\n{examples}")
DETECT = ("A unit of a language model's internal representation is described as: {explanation}\n\nFor each "
          "numbered excerpt, the marked token «like this» is where the unit would respond, if it responds. "
          "Answer with the numbers of the excerpts where it responds, comma-separated, or 'none'.\n\n{examples}")


class Explainer:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.api_key = api_key if api_key is not None else os.environ.get("DICTLAB_EXPLAINER_KEY")

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            return reply["choices"][0]["message"]["content"].strip()
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise DictlabError(f"the explainer endpoint {self.url} failed: {e}") from e


def _excerpt(example: dict) -> str:
    tokens = list(example["tokens"])
    tokens[example["target"]] = f"«{tokens[example['target']]}»"
    return "".join(tokens).replace("\n", " ")


def _numbered(examples: list[dict]) -> str:
    return "\n".join(f"{i + 1}. {_excerpt(e)}" for i, e in enumerate(examples))


def explain_units(interpretation: dict, explainer: Explainer, units: list[int] | None = None,
                  n_detect: int = 5, seed: int = 0) -> None:
    """Add `explanation` and `detection` (balanced accuracy) to the chosen units (default: every unit
    with examples), in place."""
    rng = random.Random(seed)
    chosen = units if units is not None else [u["unit"] for u in interpretation["units"] if u["top"]]
    for number in chosen:
        unit = interpretation["units"][number]
        if not unit["top"]:
            continue
        unit["explanation"] = explainer.complete(EXPLAIN.format(examples=_numbered(unit["top"])))
        firing = [e for slot in unit["samples"] for e in slot]
        silent = [e for e in interpretation["baseline"] if number not in e["active"]]
        firing, silent = rng.sample(firing, min(n_detect, len(firing))), rng.sample(silent, min(n_detect, len(silent)))
        if not firing or not silent:
            unit["detection"] = None
            continue
        shown = [(e, True) for e in firing] + [(e, False) for e in silent]
        rng.shuffle(shown)
        answer = explainer.complete(DETECT.format(explanation=unit["explanation"],
                                                  examples=_numbered([e for e, _ in shown])))
        said = {int(n) - 1 for n in re.findall(r"\d+", answer)}
        hits = sum(1 for i, (_, fires) in enumerate(shown) if fires and i in said)
        rejections = sum(1 for i, (_, fires) in enumerate(shown) if not fires and i not in said)
        unit["detection"] = (hits / len(firing) + rejections / len(silent)) / 2
