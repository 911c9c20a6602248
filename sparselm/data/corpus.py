"""Corpora: the default one (the interpreter's own standard library) or any local text.

A corpus is a list of documents (files) split into train / validation / test *by file*,
deterministically: the split of a file depends only on a hash of its relative path, so the
same file always lands in the same split and no text leaks between splits.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from sparselm.errors import SparselmError

SPLITS = ("train", "validation", "test")
# Fractions of files per split (by hash bucket out of 100).
_SPLIT_BUCKETS = {"validation": range(0, 5), "test": range(5, 10)}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html", ".c", ".h", ".js", ".yaml", ".yml", ""}
DEFAULT_NAME = "stdlib"


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root: decides the split
    path: Path


@dataclass
class Corpus:
    """Documents of one corpus, with a deterministic train/validation/test split by file."""

    name: str
    root: Path
    documents: list[Document] = field(repr=False)

    def split_of(self, doc: Document) -> str:
        if len(self.documents) < 3:  # a single file: split it by position instead (see text())
            return "all"
        bucket = int(hashlib.sha1(doc.name.encode()).hexdigest(), 16) % 100
        for split, buckets in _SPLIT_BUCKETS.items():
            if bucket in buckets:
                return split
        return "train"

    def text(self, split: str) -> str:
        """All text of `split`, documents joined by blank lines, in sorted path order."""
        if split not in SPLITS:
            raise SparselmError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if len(self.documents) < 3:
            # One or two files: the first 90% of the characters train, then 5% / 5%.
            full = "\n\n".join(_read(d.path) for d in self.documents)
            a, b = int(len(full) * 0.9), int(len(full) * 0.95)
            return {"train": full[:a], "validation": full[a:b], "test": full[b:]}[split]
        parts = [_read(d.path) for d in self.documents if self.split_of(d) == split]
        return "\n\n".join(p for p in parts if p)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of names and sizes of all documents: changes when the corpus changes."""
        h = hashlib.sha1(self.name.encode())
        for d in self.documents:
            h.update(d.name.encode())
            h.update(str(d.path.stat().st_size).encode())
        return h.hexdigest()[:16]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""  # binary or unreadable files carry no text for a language model


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(root: Path) -> list[Document]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # third-party packages are not part of the standard library; keep the walk stable
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                docs.append(Document(p.relative_to(root).as_posix(), p))
    return docs


def load_corpus(source: str | os.PathLike | Corpus | None = None) -> Corpus:
    """The default corpus (`None` or "stdlib"), or a local text file or folder.

    A folder contributes every text file below it (by suffix; hidden folders skipped).
    """
    if isinstance(source, Corpus):
        return source
    if source is None or str(source) == DEFAULT_NAME:
        root = stdlib_root()
        docs = _stdlib_documents(root)
        if not docs:
            raise SparselmError(f"no Python sources found in the standard library at {root}; pass a text file or folder instead")
        return Corpus(DEFAULT_NAME, root, docs)
    path = Path(source).expanduser()
    if not path.exists():
        raise SparselmError(f"corpus {str(source)!r} does not exist; give a text file, a folder of text files, or 'stdlib'")
    if path.is_file():
        return Corpus(path.name, path.parent, [Document(path.name, path)])
    docs = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if p.suffix.lower() in _TEXT_SUFFIXES and not fn.startswith("."):
                docs.append(Document(p.relative_to(path).as_posix(), p))
    if not docs:
        raise SparselmError(f"folder {str(path)!r} holds no text files (.txt, .md, .py, ...); point to a folder with text")
    return Corpus(path.name, path, docs)
