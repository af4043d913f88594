import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from dictlab.errors import DictlabError
from dictlab.interpret.explain import Explainer, explain_units


class FakeModel(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback: explains by the marked tokens, detects by the word 'cat'."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeModel.requests.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"]
        if prompt.startswith("Below are"):
            content = "the word " + " and ".join(sorted(set(re.findall(r"«(\w+)»", prompt))))
        else:
            lines = re.findall(r"^(\d+)\. (.*)$", prompt, flags=re.M)
            content = ", ".join(n for n, text in lines if "«cat»" in text) or "none"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), FakeModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def example(word, fires=True):
    return {"tokens": ["the ", word, " sat"], "target": 1, "scores": [0, 1.0 if fires else 0, 0]}


def test_explanation_and_detection_through_an_openai_compatible_endpoint(endpoint, monkeypatch):
    monkeypatch.setenv("DICTLAB_EXPLAINER_KEY", "sk-test")
    cat_unit = {"unit": 0, "top": [example("cat")] * 3, "samples": [[example("cat")], [example("cat")] * 4]}
    dog_unit = {"unit": 1, "top": [example("dog")] * 3, "samples": [[example("dog")] * 5]}
    silent = {"unit": 2, "top": [], "samples": [[]]}
    baseline = [{**example(w), "active": [1] if w == "dog" else []} for w in ("fish", "bird", "dog") * 3]
    interp = {"units": [cat_unit, dog_unit, silent], "baseline": baseline}
    explain_units(interp, Explainer(endpoint, "fake-model"), n_detect=4)
    assert cat_unit["explanation"] == "the word cat" and dog_unit["explanation"] == "the word dog"
    # the fake answers 'the excerpts with «cat»': right on every excerpt for the cat unit (balanced
    # accuracy 1); for the dog unit it misses every firing excerpt and rejects every silent one (0.5).
    # Silent excerpts come only from random contexts where the unit is inactive (never 'dog' for unit 1).
    assert cat_unit["detection"] == 1.0 and dog_unit["detection"] == 0.5
    assert "explanation" not in silent
    path, auth, body = FakeModel.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "fake-model"
    assert body["temperature"] == 0


def test_an_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(DictlabError, match="the explainer endpoint http://127.0.0.1:9/v1 failed"):
        Explainer("http://127.0.0.1:9/v1", "m", timeout=2).complete("hi")


def test_dictlab_interpret_explains_the_first_units_when_an_endpoint_is_given(endpoint, tmp_path, pile_dir,
                                                                              tiny_models, capsys, write_run_config):
    from dictlab.cli import main

    config = tmp_path / "c.yaml"
    write_run_config(config, "e", tiny_models["gpt2"], pile_dir, train_tokens=800, fit=[{"method": "kmeans", "k": [3]}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    folder = runs / "e" / "dictionaries" / "L1.resid_post" / "kmeans-k3"
    store = runs / "e" / "store"
    capsys.readouterr()
    assert main(["--quiet", "interpret", "--store", str(store), str(folder), "--no-coherence"]) == 0
    assert "explanations skipped: no OpenAI-compatible endpoint" in capsys.readouterr().err
    assert main(["--quiet", "interpret", "--store", str(store), str(folder), "--no-coherence",
                 "--explainer-url", endpoint, "--explain-units", "2"]) == 0
    data = json.loads((folder / "interpretation.json").read_text())
    explained = [u for u in data["units"] if "explanation" in u]
    assert len(explained) == 2 and all(u["explanation"].startswith("the word") for u in explained)
    assert all(u["detection"] is None or 0 <= u["detection"] <= 1 for u in explained)
    assert "explanation" in (folder / "cards.html").read_text()
