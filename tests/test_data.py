from pathlib import Path

import numpy as np
import pytest

from dsv3lite.data import DataError, default_data_dir, prepare, read_documents


def test_prepare_splits_by_document_deterministically(text_corpus, tmp_path):
    a = prepare(str(text_corpus), vocab_size=400, data_dir=tmp_path / "a", verbose=False)
    b = prepare(str(text_corpus), vocab_size=400, data_dir=tmp_path / "b", verbose=False)
    assert a.meta["documents"] == b.meta["documents"]
    train, val = set(a.meta["documents"]["train"]), set(a.meta["documents"]["val"])
    assert val and train and not train & val
    assert "empty.txt" not in train | val  # blank files are skipped
    assert np.array_equal(np.fromfile(a.folder / "train.bin", np.uint16),
                          np.fromfile(b.folder / "train.bin", np.uint16))


def test_tokenizer_round_trips_text_and_ids_fit_uint16(text_corpus, tmp_path):
    data = prepare(str(text_corpus), vocab_size=400, data_dir=tmp_path, verbose=False)
    tok = data.tokenizer()
    assert tok.get_vocab_size() == 400
    sample = "def f(x):\n    return {'naïve': x ** 2}  # ünïcode"
    assert tok.decode(tok.encode(sample).ids) == sample
    stream = data.stream("train")
    assert len(stream) == data.meta["tokens"]["train"] and int(stream.tokens.max()) < 400


def test_batches_are_next_token_shifted(text_corpus, tmp_path):
    import torch

    stream = prepare(str(text_corpus), vocab_size=400, data_dir=tmp_path,
                     verbose=False).stream("val")
    x, y = stream.batch(3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_unigram_entropy_is_recorded_in_nats(text_corpus, tmp_path):
    meta = prepare(str(text_corpus), vocab_size=400, data_dir=tmp_path, verbose=False).meta
    assert 0 < meta["val_unigram_entropy_nats"] < np.log(400)


def test_bad_corpora_raise_clear_errors(tmp_path):
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="holds no non-empty .txt"):
        read_documents(str(tmp_path / "blank"))
    with pytest.raises(DataError, match="corpus='nope'"):
        read_documents("nope")
    with pytest.raises(DataError, match="make data"):
        read_documents("shakespeare", data_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size=256"):
        prepare("stdlib", vocab_size=256, data_dir=tmp_path)


def test_python_corpus_is_the_standard_library_and_the_installed_packages(tmp_path, monkeypatch):
    import torch

    from dsv3lite import data

    roots = dict(data._python_roots())
    assert set(roots) >= {"stdlib", "purelib"}
    assert Path(torch.__file__).resolve().parents[1] == roots["purelib"].resolve()
    # read through small stand-ins: labels prefix the names, nothing is read twice
    std, site = tmp_path / "lib", tmp_path / "site"
    for path, text in ((std / "os.py", "import sys\n"), (std / "site-packages" / "x.py", "x"),
                       (site / "pkg" / "mod.py", "def f(): pass\n"), (site / "notes.txt", "no")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(data, "_python_roots", lambda: [("stdlib", std), ("purelib", site)])
    docs = read_documents("python")
    assert docs == [("purelib/pkg/mod.py", "def f(): pass\n"), ("stdlib/os.py", "import sys\n")]
    prepared = prepare("python", vocab_size=300, data_dir=tmp_path / "data", verbose=False)
    assert prepared.folder.name == "python-bpe300"
    split = prepared.meta["documents"]
    assert sorted(split["train"] + split["val"]) == [n for n, _ in docs] and split["val"]
    # each document is encoded once, followed by one end-of-text token
    tokenizer = prepared.tokenizer()
    eot = tokenizer.token_to_id("<|endoftext|>")
    val = prepared.stream("val").tokens
    assert list(val).count(eot) == len(split["val"]) and val[-1] == eot


def test_shakespeare_has_42_works_of_about_5_million_characters():
    if not (default_data_dir() / "raw").is_dir():
        pytest.skip("run `make data` first")
    docs = read_documents("shakespeare")
    assert len(docs) == 42
    assert 5.0e6 < sum(len(t) for _, t in docs) < 5.1e6
