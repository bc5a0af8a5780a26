import json

import pytest
import torch

from edkm.errors import InputError
from edkm.io.data import (
    Document,
    load_documents,
    split_documents,
    token_blocks,
)


def test_default_articles_split_is_deterministic_and_disjoint():
    docs = load_documents("default")
    assert len(docs) == 106  # real articles in the gensim dump (redirects dropped)
    assert not any(d.text.upper().startswith("#REDIRECT") for d in docs)
    a, b = split_documents(docs), split_documents(list(reversed(docs)))
    assert {d.title for d in a.eval_docs} == {d.title for d in b.eval_docs}
    train_titles = {d.title for d in a.train_docs}
    eval_titles = {d.title for d in a.eval_docs}
    assert not train_titles & eval_titles
    assert len(train_titles | eval_titles) == len(docs)
    assert 0.1 < len(eval_titles) / len(docs) < 0.3
    assert len(a.eval_text) > 100_000


def test_split_is_stable_when_documents_are_added():
    docs = [Document(f"doc {i}", f"text {i}") for i in range(40)]
    before = split_documents(docs)
    after = split_documents([*docs, *(Document(f"new {i}", "x") for i in range(10))])
    old_eval = {d.title for d in after.eval_docs if d.title.startswith("doc")}
    assert old_eval == {d.title for d in before.eval_docs}


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n\nthird doc\n")
    assert [d.text for d in load_documents(txt)] == [
        "first doc\nline two",
        "second doc",
        "third doc",
    ]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "alpha", "title": "A"}) + "\n\n" + json.dumps("beta") + "\n")
    assert [(d.title, d.text) for d in load_documents(jl)] == [("A", "alpha"), ("", "beta")]
    assert len(load_documents(tmp_path)) == 5


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ("", ".txt", "is empty"),
        ("\n\n  \n", ".txt", "is empty"),
        ('{"nope": 1}\n', ".jsonl", "no string field 'text'"),
        ("{broken\n", ".jsonl", "not valid JSON"),
        ("x", ".csv", "expected .txt or .jsonl"),
    ],
)
def test_bad_text_files(tmp_path, content, suffix, message):
    path = tmp_path / f"f{suffix}"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_documents(path)


def test_missing_file():
    with pytest.raises(InputError, match="does not exist"):
        load_documents("no/such/file.txt")


def test_split_needs_two_documents():
    with pytest.raises(InputError, match="at least 2 documents"):
        split_documents([Document("", "only one")])
    tiny = split_documents([Document("", "a"), Document("", "b")])
    assert len(tiny.train_docs) == 1 and len(tiny.eval_docs) == 1


def test_token_blocks():
    ids = torch.arange(11)
    blocks = token_blocks(ids, 5)
    assert blocks.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(InputError, match="shorter than one window"):
        token_blocks(torch.arange(3), 5)
    with pytest.raises(InputError, match="at least 2"):
        token_blocks(ids, 1)
