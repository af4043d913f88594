import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dictlab.data.corpus import contexts, documents, split_of
from dictlab.errors import DictlabError

DOCS = ["the cat sat", "dogs ran in parks", "code runs fast"]


@pytest.fixture
def corpus_files(tmp_path, write_pile_jsonl_zst):
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    write_pile_jsonl_zst(tmp_path / "a.jsonl.zst", DOCS)
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    return tmp_path


@pytest.mark.parametrize("name", ["txt", "a.jsonl", "a.jsonl.zst", "a.parquet"])
def test_every_local_format_gives_the_documents_in_order(corpus_files, name):
    assert list(documents(str(corpus_files / name))) == DOCS


def test_hub_path_streams_a_dataset_folder(pile_dir, sentences):
    # the same datasets.load_dataset(..., streaming=True) call that reads monology/pile-uncopyrighted
    docs = list(documents(f"hub:{pile_dir}"))
    assert docs == sentences(120, seed=1)


def test_embedded_corpus_is_prose_and_code():
    docs = documents("embedded")
    first = [next(docs) for _ in range(4)]
    assert any("def " in d or "import " in d for d in first)  # standard-library source
    assert all(isinstance(d, str) and d for d in first)


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(DictlabError, match="not found"):
        list(documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DictlabError, match=r"unsupported file type 'x.csv'.*\.jsonl\.zst"):
        list(documents(str(tmp_path / "x.csv")))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DictlabError, match="no field 'text'.*body"):
        list(documents(str(tmp_path / "b.jsonl")))


def test_split_is_by_document_and_contexts_start_with_bos(tiny_models, sentences):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    docs = sentences(200, seed=3, words_per_doc=90)
    seen = {}
    for split in ("train", "eval"):
        ctxs = list(contexts(iter(docs), tok, 2, split, context_length=16, eval_fraction=0.2, seed=0))
        assert ctxs and all(c.tokens[0] == 2 and 2 <= len(c.tokens) <= 16 for c in ctxs)
        assert [c.index for c in ctxs] == list(range(len(ctxs)))
        assert all(split_of(c.doc, 0.2, 0) == split for c in ctxs)
        seen[split] = {c.doc for c in ctxs}
        # a document's contexts, joined, give back its tokens
        doc = ctxs[0].doc
        joined = [t for c in ctxs if c.doc == doc for t in c.tokens[1:]]
        assert joined == tok(docs[doc], add_special_tokens=False)["input_ids"]
    assert not seen["train"] & seen["eval"]
    assert 0.1 < len(seen["eval"]) / 200 < 0.3
    # contexts_per_document: a document's first N contexts only, the same ones as without the cap
    every = list(contexts(iter(docs), tok, 2, "eval", context_length=16, eval_fraction=0.2, seed=0))
    capped = list(contexts(iter(docs), tok, 2, "eval", context_length=16, eval_fraction=0.2, seed=0, per_document=2))
    first_two = [c for c in every if sum(1 for o in every[:every.index(c)] if o.doc == c.doc) < 2]
    assert len(capped) < len(every) and [(c.doc, c.tokens) for c in capped] == [(c.doc, c.tokens) for c in first_two]
