"""Text for training, calibration and evaluation.

Sources (``DATA`` on the command line; never a hub name, nothing is downloaded):

- ``"default"``: the real Wikipedia articles shipped inside the ``gensim`` wheel (its test
  data, 107 pages), cleaned with ``gensim.corpora.wikicorpus.filter_wiki``; redirects and stubs
  are dropped, 106 articles remain;
- a ``.txt`` file: documents separated by one or more blank lines;
- a ``.jsonl`` file: one JSON object per line with a string field ``text`` (the text column)
  and an optional ``"title"``, or a bare JSON string;
- a ``.parquet``, ``.arrow``, ``.json`` (JSON lines or an array of objects) or ``.csv`` file:
  one row per document, read with ``datasets.load_dataset(<format>, data_files=...)``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, read with
  ``datasets.load_from_disk``: of a ``DatasetDict`` the split ``train`` is used, or its only
  split; ``PATH:SPLIT`` picks another one (e.g. ``my_data:validation``);
- any other folder: every file in it (recursively, in sorted path order) of the kinds above; a
  saved dataset inside it is read as one source.

Rows read through ``datasets`` take their text from the column ``text_column`` (default
``"text"``; ``--text-column`` on the command line), which must be a string column; a missing or
non-string column is an ``InputError`` naming the columns there are. A string column ``title``,
when present, names the document (as in ``.jsonl``). Empty or null texts are skipped.

Why ``datasets``: it brings the Arrow/parquet/csv/json readers (with type inference, nulls and
sharded files) and the saved-folder format that users already have; data files are converted
into its Arrow cache under ``<edkm cache>/datasets`` (``$EDKM_CACHE_DIR``, see
:mod:`edkm.io.paths`), ``HF_DATASETS_OFFLINE=1`` is set first and ``datasets`` is imported only
when such a source is read. Still hand-written here: the ``.txt`` and ``.jsonl`` readers (their
document boundaries are edkm's own), the default gensim corpus, and the split below.

Split protocol (deterministic, by document, never by position inside a document): each document
gets a stable key (its title, else the SHA-256 of its text); ``sha256("edkm-split:" + key)``
mapped to [0, 1) decides held-out evaluation (below ``eval_fraction``) or training/calibration.
The decision of a document never depends on the other documents, so adding text to a corpus
never moves an existing document across the split, whatever format it is read from. Held-out
text is never used for training or calibration. If a corpus would leave one side empty (a very
small corpus), the last document (in corpus order) is moved to the empty side.

Example:
    >>> from edkm.io.data import load_documents, split_documents
    >>> docs = load_documents("default")  # doctest: +SKIP
    >>> split = split_documents(docs)  # doctest: +SKIP
    >>> len(split.train_docs) + len(split.eval_docs)  # doctest: +SKIP
    106
    >>> import tempfile
    >>> from datasets import Dataset
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Dataset.from_dict({"body": ["one doc", "another doc"]}).save_to_disk(folder)
    ...     docs = load_documents(folder, text_column="body")
    >>> [d.text for d in docs]
    ['one doc', 'another doc']
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError, first_line
from edkm.io.paths import cache_dir, existing_path, set_offline_env

DEFAULT_DATA = "default"
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_EVAL_FRACTION = 0.2
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_CHARS = 200
DOC_SEPARATOR = "\n\n"
# file suffix -> the ``datasets`` packaged builder that reads it
_DATASET_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}
_SUFFIXES = (".txt", ".jsonl", *_DATASET_FORMATS)
_EXPECTED = ", ".join(_SUFFIXES[:-1]) + f" or {_SUFFIXES[-1]}"
# a folder holding one of these was written by save_to_disk
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_MISSING_HINT = " (DATA is a local file or folder, or 'default'; nothing is downloaded)"


@dataclass(frozen=True)
class Document:
    """One document of a corpus; ``title`` may be empty for untitled text."""

    title: str
    text: str

    @property
    def key(self) -> str:
        return self.title or hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class TextSplit:
    """Training/calibration documents and held-out evaluation documents."""

    train_docs: tuple[Document, ...]
    eval_docs: tuple[Document, ...]

    @property
    def train_text(self) -> str:
        return DOC_SEPARATOR.join(d.text for d in self.train_docs)

    @property
    def eval_text(self) -> str:
        return DOC_SEPARATOR.join(d.text for d in self.eval_docs)


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)  # bold/italic quote markup left by filter_wiki
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


def default_wiki_path() -> Path:
    """Path of the Wikipedia dump shipped in the ``gensim`` wheel."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default text needs the package 'gensim' (pip install gensim)")
    path = Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE
    if not path.is_file():
        raise InputError("gensim is installed but its Wikipedia test dump is missing")
    return path


def load_default_articles() -> list[Document]:
    """The default corpus: real Wikipedia articles (redirects and stubs dropped), in dump order."""
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(default_wiki_path()) as handle:
        for title, raw, _pageid in extract_pages(handle):
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean_wiki(raw)
            if len(text) >= _MIN_ARTICLE_CHARS:
                docs.append(Document(title=title, text=text))
    return docs


def _read_txt(path: Path) -> list[Document]:
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [Document(title="", text=p) for p in parts if p]


def _read_jsonl(path: Path, text_column: str = DEFAULT_TEXT_COLUMN) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
            if isinstance(obj, str):
                text, title = obj, ""
            elif isinstance(obj, dict) and isinstance(obj.get(text_column), str):
                text, title = obj[text_column], str(obj.get("title", ""))
            else:
                raise InputError(f"{path}: line {lineno} has no string field '{text_column}'")
            if text.strip():
                docs.append(Document(title=title, text=text.strip()))
    return docs


# ---- sources read through Hugging Face ``datasets`` ----------------------------------------


def _datasets() -> Any:
    """The ``datasets`` module, imported offline and without its progress bars."""
    set_offline_env()
    import datasets

    datasets.utils.logging.disable_progress_bar()
    return datasets


@contextlib.contextmanager
def _dataset_errors(what: str) -> Iterator[Any]:
    """Yield ``datasets``; its failures (logged, then raised) become one-line ``InputError``s."""
    import pyarrow

    datasets = _datasets()
    logging = datasets.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.CRITICAL)  # the error is re-raised below, in one line
    try:
        yield datasets
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise InputError(f"cannot read {what}: {first_line(cause)}") from err
    finally:
        logging.set_verbosity(verbosity)


def _names(names: Any) -> str:
    return ", ".join(f"'{n}'" for n in names) or "none"


def _is_string(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _dataset_documents(ds: Any, what: str, text_column: str) -> list[Document]:
    """One document per row of a ``datasets.Dataset``: its ``text_column`` (and ``title``)."""
    features = ds.features
    if text_column not in features:
        raise InputError(
            f"{what} has no column '{text_column}'; its columns: {_names(features)} "
            "(choose one with --text-column)"
        )
    if not _is_string(features[text_column]):
        feature = features[text_column]
        kind = getattr(feature, "dtype", type(feature).__name__)
        strings = [name for name, f in features.items() if _is_string(f)]
        raise InputError(
            f"{what}: column '{text_column}' holds {kind}, not text; "
            f"its string columns: {_names(strings)}"
        )
    titled = text_column != "title" and _is_string(features.get("title"))
    columns = [text_column, "title"] if titled else [text_column]
    docs = []
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        titles = batch["title"] if titled else itertools.repeat(None)
        for text, title in zip(batch[text_column], titles):
            if text and text.strip():
                docs.append(Document(title=title or "", text=text.strip()))
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _read_saved(path: Path, split: str | None, text_column: str) -> list[Document]:
    """Rows of a folder written by ``save_to_disk`` (a ``DatasetDict``: ``split``, else module docs)."""
    with _dataset_errors(f"saved dataset '{path}'") as datasets:
        loaded = datasets.load_from_disk(str(path))
    what = f"saved dataset '{path}'"
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            split = "train" if "train" in loaded or len(names) != 1 else names[0]
        if split not in loaded:
            raise InputError(
                f"{what} has no split '{split}'; its splits: {_names(names)} "
                f"(choose one as '{path}:SPLIT')"
            )
        loaded, what = loaded[split], f"split '{split}' of {what}"
    elif split is not None and split != str(loaded.split):
        raise InputError(
            f"{what} is a single Dataset, not a DatasetDict: it has no split '{split}'"
        )
    return _dataset_documents(loaded, what, text_column)


def _read_data_file(path: Path, fmt: str, text_column: str) -> list[Document]:
    with _dataset_errors(f"'{path}' as {fmt}") as datasets:
        ds = datasets.load_dataset(
            fmt, data_files=[str(path)], split="train", cache_dir=str(cache_dir() / "datasets")
        )
    return _dataset_documents(ds, f"'{path}'", text_column)


# ---- one entry point for every source ------------------------------------------------------


def _read_file(path: Path, text_column: str = DEFAULT_TEXT_COLUMN) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_column)
    if suffix in _DATASET_FORMATS:
        return _read_data_file(path, _DATASET_FORMATS[suffix], text_column)
    raise InputError(
        f"unsupported text file '{path}': expected {_EXPECTED}, or a saved dataset folder"
    )


def _folder_sources(root: Path) -> list[Path]:
    """Files of a folder in sorted path order; a saved dataset inside it counts as one source."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file())
    sources: dict[Path, None] = {}
    for file in files:
        source = file
        for parent in file.relative_to(root).parents:  # innermost first; keep the outermost
            if parent != Path(".") and _is_saved_dataset(root / parent):
                source = root / parent
        sources.setdefault(source, None)
    return list(sources)


def _parse_spec(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``(path, split)``: ``PATH:SPLIT`` names a split when ``PATH`` is a folder (module docs)."""
    text = str(spec)
    head, sep, split = text.rpartition(":")
    if sep and head and split and not Path(text).expanduser().exists():
        folder = Path(head).expanduser()
        if folder.is_dir():
            if not _is_saved_dataset(folder):
                raise InputError(
                    f"'{spec}': ':{split}' names a split, but '{head}' is not a saved dataset "
                    "folder (save_to_disk)"
                )
            return folder, split
    return existing_path(spec, "data path", _MISSING_HINT), None


def load_documents(
    spec: str | os.PathLike[str] = DEFAULT_DATA, *, text_column: str = DEFAULT_TEXT_COLUMN
) -> list[Document]:
    """Load documents from ``"default"``, a file, a saved dataset or a folder (module docs).

    ``text_column`` names the column (or ``.jsonl`` field) that holds the text; ``.txt`` files
    and the default corpus have none.

    Example:
        >>> load_documents("missing.txt")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: data path 'missing.txt' does not exist (DATA is a local file or folder, or 'default'; nothing is downloaded)
    """
    if not text_column:
        raise InputError("the text column must be a non-empty name")
    if str(spec) == DEFAULT_DATA:
        return load_default_articles()
    path, split = _parse_spec(spec)
    if split is not None or (path.is_dir() and _is_saved_dataset(path)):
        docs = _read_saved(path, split, text_column)
    elif path.is_dir():
        sources = _folder_sources(path)
        if not sources:
            raise InputError(f"folder '{spec}' holds no {_EXPECTED} files")
        docs = []
        for source in sources:
            if source.is_dir():
                docs += _read_saved(source, None, text_column)
            else:
                docs += _read_file(source, text_column)
    else:
        docs = _read_file(path, text_column)
    if not docs:
        raise InputError(f"text source '{spec}' is empty")
    return docs


def _eval_score(doc: Document) -> float:
    digest = hashlib.sha256(f"edkm-split:{doc.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> TextSplit:
    """Split documents deterministically into training and held-out evaluation (module docs).

    Example:
        >>> docs = [Document(f"t{i}", "some text") for i in range(50)]
        >>> s = split_documents(docs, eval_fraction=0.2)
        >>> len(s.train_docs) + len(s.eval_docs), 0 < len(s.eval_docs) < 50
        (50, True)
    """
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(docs) < 2:
        raise InputError(
            f"need at least 2 documents to hold one out for evaluation, got {len(docs)} "
            "(separate documents by blank lines in .txt files)"
        )
    train = [d for d in docs if _eval_score(d) >= eval_fraction]
    held = [d for d in docs if _eval_score(d) < eval_fraction]
    if not held:
        held.append(train.pop())
    elif not train:
        train.append(held.pop())
    return TextSplit(train_docs=tuple(train), eval_docs=tuple(held))


def load_split(
    spec: str | os.PathLike[str] = DEFAULT_DATA,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    *,
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> TextSplit:
    """``split_documents(load_documents(spec, text_column=...), eval_fraction)``.

    Example:
        >>> split = load_split("default")  # doctest: +SKIP
    """
    return split_documents(load_documents(spec, text_column=text_column), eval_fraction)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor (no special tokens added).

    Example:
        >>> ids = tokenize(tok, "Hello world")  # doctest: +SKIP
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(ids: torch.Tensor, block_size: int, *, what: str = "text") -> torch.Tensor:
    """Cut a 1-D token stream into ``(n_blocks, block_size)`` non-overlapping blocks.

    The tail shorter than one block is dropped. Fewer tokens than one block is an error.

    Example:
        >>> token_blocks(torch.arange(10), 4).shape
        torch.Size([2, 4])
    """
    if block_size < 2:
        raise InputError(f"sequence length must be at least 2, got {block_size}")
    n = ids.numel() // block_size
    if n == 0:
        raise InputError(
            f"{what} has {ids.numel()} tokens, shorter than one window of {block_size} tokens"
        )
    return ids[: n * block_size].view(n, block_size)
