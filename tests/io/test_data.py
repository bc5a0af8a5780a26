import json

import datasets
import pytest
import torch

from edkm.errors import InputError
from edkm.io.data import (
    Document,
    load_documents,
    split_documents,
    token_blocks,
)

# ---- .txt / .jsonl, the default corpus and the split ----------------------------------------


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
        ("x", ".xml", "expected .txt, .jsonl, .parquet, .arrow, .json or .csv"),
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
    with pytest.raises(InputError, match="nothing is downloaded"):
        load_documents("wikitext")  # a hub name is never fetched


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


# ---- user data through Hugging Face datasets: saved folders, parquet/arrow/json/csv files ------

TEXTS = ["first document", "second document\nwith two lines", "third document", "fourth one"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    # load_dataset converts data files into an Arrow cache: keep it out of the user's cache
    # (and out of tmp_path, which some tests read as a folder of text)
    monkeypatch.setenv("EDKM_CACHE_DIR", str(tmp_path_factory.mktemp("edkm-cache")))
    datasets.utils.logging.disable_progress_bar()


def _table(**extra):
    return datasets.Dataset.from_dict({"text": TEXTS, **extra})


def _texts(docs):
    return [d.text for d in docs]


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".csv"])
def test_data_files(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    write = {".parquet": "to_parquet", ".json": "to_json", ".csv": "to_csv"}[suffix]
    getattr(_table(n=list(range(len(TEXTS)))), write)(str(path))
    assert _texts(load_documents(path)) == TEXTS


def test_arrow_file_and_json_array(tmp_path):
    saved = tmp_path / "saved"
    _table().save_to_disk(str(saved))
    (arrow,) = saved.glob("*.arrow")
    assert _texts(load_documents(arrow)) == TEXTS
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": t} for t in TEXTS]))
    assert _texts(load_documents(array)) == TEXTS


def test_saved_dataset_and_titles_keep_document_identity(tmp_path):
    titles = [f"title {i}" for i in range(len(TEXTS))]
    _table(title=titles).save_to_disk(str(tmp_path / "saved"))
    docs = load_documents(tmp_path / "saved")
    assert docs == [Document(t, x) for t, x in zip(titles, TEXTS)]
    # the split of a document is the same whatever file it comes from
    jl = tmp_path / "same.jsonl"
    jl.write_text(
        "".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in zip(titles, TEXTS))
    )
    assert split_documents(docs) == split_documents(load_documents(jl))


def test_saved_dataset_dict_split_choice(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": _table(), "validation": datasets.Dataset.from_dict({"text": ["held", "out"]})}
    ).save_to_disk(str(folder))
    assert _texts(load_documents(folder)) == TEXTS  # 'train' by default
    assert _texts(load_documents(f"{folder}:validation")) == ["held", "out"]
    with pytest.raises(InputError, match=r"no split 'test'; its splits: 'train', 'validation'"):
        load_documents(f"{folder}:test")


def test_dataset_dict_without_train(tmp_path):
    only = tmp_path / "only"
    datasets.DatasetDict({"test": _table()}).save_to_disk(str(only))
    assert _texts(load_documents(only)) == TEXTS  # the only split
    two = tmp_path / "two"
    datasets.DatasetDict({"a": _table(), "b": _table()}).save_to_disk(str(two))
    with pytest.raises(InputError, match=r"no split 'train'; its splits: 'a', 'b'.*:SPLIT"):
        load_documents(two)


def test_text_column_option(tmp_path):
    path = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": TEXTS, "id": [1, 2, 3, 4]}).to_parquet(str(path))
    assert _texts(load_documents(path, text_column="body")) == TEXTS
    with pytest.raises(InputError) as missing:
        load_documents(path)
    message = str(missing.value)
    assert "no column 'text'" in message and "'body', 'id'" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(InputError, match=r"column 'id' holds int64, not text.*'body'"):
        load_documents(path, text_column="id")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"body": "alpha"}) + "\n" + json.dumps({"body": "beta"}) + "\n")
    assert _texts(load_documents(jl, text_column="body")) == ["alpha", "beta"]


def test_empty_and_null_rows_are_skipped(tmp_path):
    path = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": ["kept", None, "  ", "also kept"]}).to_parquet(str(path))
    assert _texts(load_documents(path)) == ["kept", "also kept"]
    empty = tmp_path / "e.parquet"
    datasets.Dataset.from_dict({"text": [None, ""]}).to_parquet(str(empty))
    with pytest.raises(InputError, match="is empty"):
        load_documents(empty)


def test_folder_mixes_files_and_saved_datasets(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("from txt\n\nsecond from txt\n")
    datasets.Dataset.from_dict({"text": ["from parquet"]}).to_parquet(str(root / "b.parquet"))
    datasets.Dataset.from_dict({"text": ["from saved"]}).save_to_disk(str(root / "c_saved"))
    assert _texts(load_documents(root)) == [
        "from txt",
        "second from txt",
        "from parquet",
        "from saved",
    ]


@pytest.mark.parametrize(
    "content,suffix",
    [("not parquet", ".parquet"), ("{broken", ".json"), ("not arrow", ".arrow")],
)
def test_broken_files_are_one_line_errors(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(InputError, match=f"cannot read '.*bad{suffix}'") as err:
        load_documents(path)
    assert len(str(err.value).splitlines()) == 1


def test_split_suffix_needs_a_saved_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a saved dataset folder"):
        load_documents(f"{tmp_path / 'plain'}:train")
    _table().save_to_disk(str(tmp_path / "single"))
    with pytest.raises(InputError, match="single Dataset"):
        load_documents(f"{tmp_path / 'single'}:validation")
    with pytest.raises(InputError, match="does not exist"):
        load_documents(f"{tmp_path / 'missing'}:train")
