"""Text for training, calibration and evaluation.

Sources: a user's local ``.txt`` / ``.jsonl`` file (or a folder of them), or the default text:
the 107 real Wikipedia articles shipped inside the ``gensim`` wheel (its test data), cleaned with
``gensim.corpora.wikicorpus.filter_wiki``.

Split protocol (deterministic, by document, never by position inside a document): each document
gets a stable key (its title, else the SHA-256 of its text); ``sha256("edkm-split:" + key)``
mapped to [0, 1) decides held-out evaluation (below ``eval_fraction``) or training/calibration.
The decision of a document never depends on the other documents, so adding text to a corpus
never moves an existing document across the split. Held-out text is never used for training or
calibration. If a corpus would leave one side empty (a very small corpus), the last document
(in corpus order) is moved to the empty side.

Document boundaries in files:
- ``.txt``: documents are separated by one or more blank lines;
- ``.jsonl``: one JSON object per line with a ``"text"`` field (and an optional ``"title"``),
  or a bare JSON string.

Example:
    >>> from edkm.io.data import load_documents, split_documents
    >>> docs = load_documents("default")  # doctest: +SKIP
    >>> split = split_documents(docs)  # doctest: +SKIP
    >>> len(split.train_docs) + len(split.eval_docs)  # doctest: +SKIP
    107
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edkm.errors import InputError

DEFAULT_DATA = "default"
DEFAULT_EVAL_FRACTION = 0.2
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_CHARS = 200
DOC_SEPARATOR = "\n\n"


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


def _read_jsonl(path: Path) -> list[Document]:
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
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                text, title = obj["text"], str(obj.get("title", ""))
            else:
                raise InputError(f"{path}: line {lineno} has no string field 'text'")
            if text.strip():
                docs.append(Document(title=title, text=text.strip()))
    return docs


def _read_file(path: Path) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    raise InputError(f"unsupported text file '{path}': expected .txt or .jsonl")


def load_documents(spec: str | os.PathLike[str] = DEFAULT_DATA) -> list[Document]:
    """Load documents from ``"default"``, a ``.txt``/``.jsonl`` file, or a folder of them.

    Example:
        >>> load_documents("missing.txt")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: text file 'missing.txt' does not exist
    """
    if str(spec) == DEFAULT_DATA:
        return load_default_articles()
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"text file '{spec}' does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in {".txt", ".jsonl"})
        if not files:
            raise InputError(f"folder '{spec}' holds no .txt or .jsonl files")
        docs = [d for f in files for d in _read_file(f)]
    else:
        docs = _read_file(path)
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
    spec: str | os.PathLike[str] = DEFAULT_DATA, eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> TextSplit:
    """``split_documents(load_documents(spec))``.

    Example:
        >>> split = load_split("default")  # doctest: +SKIP
    """
    return split_documents(load_documents(spec), eval_fraction)


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
