import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from datasets import Dataset

from training.data import (
    DEFAULT_TASKS,
    WindowLoader,
    build_embedded_corpus,
    clean_documents,
    format_document,
    load_documents,
    pack_documents,
    split_documents,
    split_window,
    tokenize_documents,
)
from training.tokenizer import train_tokenizer

NUM_DOCS = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_embedded_corpus(NUM_DOCS, seed=0, cache_dir=tmp_path_factory.mktemp("corpus"))


# ---- embedded corpus -----------------------------------------------------------------------------


def test_embedded_corpus_shape_and_content(corpus):
    assert len(corpus) == NUM_DOCS
    assert set(corpus.column_names) == {"id", "task", "question", "solution", "answer", "text"}
    assert len(set(corpus["id"])) == NUM_DOCS
    assert set(corpus["task"]) == set(DEFAULT_TASKS)
    gsm = corpus.filter(lambda row: row["task"] == "gsm_symbolic")
    assert len(gsm) == NUM_DOCS // 2  # the largest share
    for row in gsm:
        assert row["solution"].strip() and row["answer"].strip()
        assert "####" not in row["solution"]  # the answer is not leaked ahead of "Answer:"
    for row in corpus:
        assert row["text"] == format_document(row["question"], row["solution"], row["answer"])
        assert row["text"].startswith("Question: ") and row["text"].endswith(f"\nAnswer: {row['answer']}")


def test_embedded_corpus_deterministic(corpus, tmp_path):
    again = build_embedded_corpus(NUM_DOCS, seed=0, cache_dir=tmp_path / "a")  # fresh, not cached
    assert again["id"] == corpus["id"] and again["text"] == corpus["text"]
    other = build_embedded_corpus(NUM_DOCS, seed=1, cache_dir=tmp_path / "a")
    assert other["text"] != corpus["text"]
    assert len(set(other["text"]) & set(corpus["text"])) < NUM_DOCS // 2


def test_embedded_corpus_cached(tmp_path, monkeypatch):
    import reasoning_gym

    first = build_embedded_corpus(20, seed=3, cache_dir=tmp_path)
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and not names[0].startswith(".")  # one cache folder, no temp left behind

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")

    monkeypatch.setattr(reasoning_gym, "create_dataset", no_generation)
    second = build_embedded_corpus(20, seed=3, cache_dir=tmp_path)
    assert second["text"] == first["text"] and second["id"] == first["id"]
    with pytest.raises(AssertionError, match="regenerated"):  # other settings are a different cache
        build_embedded_corpus(21, seed=3, cache_dir=tmp_path)


# ---- split -----------------------------------------------------------------------------------------


def test_split_deterministic_disjoint_complete(corpus):
    train, heldout = split_documents(corpus, 0.2, seed=5)
    assert len(heldout) > 0 and len(train) > len(heldout)
    assert not set(train["id"]) & set(heldout["id"])
    assert not set(train["text"]) & set(heldout["text"])
    assert sorted(list(train["id"]) + list(heldout["id"])) == sorted(corpus["id"])
    train2, heldout2 = split_documents(corpus, 0.2, seed=5)
    assert train2["id"] == train["id"] and heldout2["id"] == heldout["id"]
    _, heldout3 = split_documents(corpus, 0.2, seed=6)
    assert set(heldout3["id"]) != set(heldout["id"])


def test_split_keeps_duplicates_together_and_small_heldout_nonempty():
    ds = Dataset.from_dict({"id": [str(i) for i in range(6)], "text": ["a", "a", "b", "c", "c", "c"]})
    for seed in range(10):
        train, heldout = split_documents(ds, 0.3, seed=seed)
        assert not set(train["text"]) & set(heldout["text"])
        assert len(train) + len(heldout) == 6
    two = Dataset.from_dict({"id": ["x", "y"], "text": ["first", "second"]})
    train, heldout = split_documents(two, 0.01, seed=0)
    assert len(train) == 1 and len(heldout) == 1
    train, heldout = split_documents(two, 0.0, seed=0)
    assert len(train) == 2 and len(heldout) == 0


# ---- packing ---------------------------------------------------------------------------------------


def test_pack_windows_overlap_and_cover_stream():
    eos = 1
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40, 41, 42, 43, 44]]
    stream = [t for d in docs for t in d + [eos]]  # 17 tokens
    seq_len = 4
    windows = pack_documents(docs, eos_id=eos, seq_len=seq_len)
    assert windows.dtype == torch.long and windows.shape == ((len(stream) - 1) // seq_len, seq_len + 1)
    # consecutive windows share exactly one boundary token
    assert torch.equal(windows[:-1, -1], windows[1:, 0])
    # every stream token (after the first, before the dropped tail) is a target exactly once
    targets = windows[:, 1:].reshape(-1).tolist()
    assert targets == stream[1 : 1 + len(targets)]
    # the windows rebuild the stream, EOS between documents
    rebuilt = windows[0].tolist() + windows[1:, 1:].reshape(-1).tolist()
    assert rebuilt == stream[: len(rebuilt)]
    assert rebuilt[3] == eos and rebuilt[6] == eos


def test_pack_errors():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="seq_len"):
            pack_documents([[1, 2, 3]], eos_id=0, seq_len=bad)
    with pytest.raises(ValueError, match=r"5 tokens.*at least 9"):
        pack_documents([[5, 6], [7]], eos_id=0, seq_len=8)


def test_tokenize_and_pack_corpus(corpus):
    tokenizer = train_tokenizer(corpus["text"], vocab_size=300)
    ids = tokenize_documents(tokenizer, list(corpus["text"]), batch_size=16)
    assert len(ids) == len(corpus)
    assert tokenizer.decode(ids[0]) == corpus[0]["text"]
    eos = tokenizer.eos_token_id
    windows = pack_documents(ids, eos_id=eos, seq_len=64)
    stream = windows[0].tolist() + windows[1:, 1:].reshape(-1).tolist()
    assert stream == [t for doc in ids for t in doc + [eos]][: len(stream)]
    assert tokenizer.decode(stream[: stream.index(eos)]) == corpus[0]["text"]


# ---- cleaning and loading --------------------------------------------------------------------------


def test_clean_documents_skips_empty():
    ds = Dataset.from_dict({"id": list("abcde"), "text": ["keep me", "", "  \n\t", None, "and me"]})
    kept, skipped = clean_documents(ds)
    assert skipped == 3
    assert kept["text"] == ["keep me", "and me"] and kept["id"] == ["a", "e"]
    kept, skipped = clean_documents(Dataset.from_dict({"text": [None, None]}))  # a null-typed column
    assert len(kept) == 0 and skipped == 2
    kept, skipped = clean_documents(Dataset.from_dict({"text": [1, 2]}))  # not strings
    assert len(kept) == 0 and skipped == 2


ROWS = [{"text": "first document", "label": 1}, {"text": "second\ndocument", "label": 2}]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_load_documents_formats(tmp_path, fmt):
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    else:
        Dataset.from_list(ROWS).to_parquet(str(path))
    ds = load_documents(str(path), cache_dir=str(tmp_path / "hf"))
    assert ds["text"] == [r["text"] for r in ROWS]
    assert ds["id"] == [f"corpus.{fmt}:0", f"corpus.{fmt}:1"]


def test_load_documents_text_dir_and_glob(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "data" / "b.txt").write_text("line three\n")
    ds = load_documents(str(tmp_path / "data" / "a.txt"), cache_dir=str(tmp_path / "hf"))
    assert ds["text"] == ["line one", "line two"] and ds["id"] == ["a.txt:0", "a.txt:1"]
    for source in (str(tmp_path / "data"), str(tmp_path / "data" / "*.txt")):
        ds = load_documents(source, cache_dir=str(tmp_path / "hf"))
        assert ds["text"] == ["line one", "line two", "line three"]
        assert len(set(ds["id"])) == 3


def test_load_documents_errors(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_documents(str(missing))
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(KeyError, match="body") as err:
        load_documents(str(path), text_field="body", cache_dir=str(tmp_path / "hf"))
    assert "label" in str(err.value)  # names the columns present
    with pytest.raises(ValueError, match="parquet"):
        load_documents(str(path), data_format="xml")
    odd = tmp_path / "c.xml"
    odd.write_text("<a/>")
    with pytest.raises(ValueError, match="jsonl"):
        load_documents(str(odd))


# ---- loader ----------------------------------------------------------------------------------------


def _take(loader: WindowLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(n)]


def test_window_loader_resume_matches_uninterrupted():
    windows = torch.arange(10 * 5).view(10, 5)  # 10 windows of seq_len 4
    batch_size, total = 3, 11  # 3 batches per epoch: the run crosses three epoch boundaries
    reference = _take(WindowLoader(windows, batch_size, seed=7), total)
    for k in range(total):
        first = WindowLoader(windows, batch_size, seed=7)
        _take(first, k)
        state = first.state_dict()
        assert set(state) == {"epoch", "cursor"}
        resumed = WindowLoader(windows, batch_size, seed=7)
        resumed.load_state_dict(state)
        for got, want in zip(_take(resumed, total - k), reference[k:]):
            assert torch.equal(got, want)


def test_window_loader_epochs_and_options():
    windows = torch.arange(10 * 5).view(10, 5)
    loader = WindowLoader(windows, batch_size=3, seed=0)
    assert loader.tokens_per_batch == 3 * 4
    epochs = [torch.cat(_take(loader, 3))[:, 0].tolist() for _ in range(3)]
    for order in epochs:
        assert len(set(order)) == 9  # a permutation, last partial batch dropped
    assert len({tuple(o) for o in epochs}) > 1  # reshuffled each epoch
    other_seed = torch.cat(_take(WindowLoader(windows, batch_size=3, seed=1), 3))[:, 0].tolist()
    assert other_seed != epochs[0]
    plain = WindowLoader(windows, batch_size=5, seed=0, shuffle=False)
    assert torch.equal(plain.next_batch(), windows[:5]) and torch.equal(plain.next_batch(), windows[5:])
    assert torch.equal(plain.next_batch(), windows[:5]) and plain.state_dict() == {"epoch": 1, "cursor": 1}
    with pytest.raises(ValueError, match=r"batch_size=11.*10"):
        WindowLoader(windows, batch_size=11, seed=0)


def test_split_window_masks_each_new_documents_first_target():
    eos = 0
    docs = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    windows = pack_documents(docs, eos, 6)  # stream 5 6 7 0 8 9 0 10 11 12 0 13 0
    inputs, targets = split_window(windows, eos)
    plain_inputs, plain = split_window(windows)
    assert torch.equal(inputs, plain_inputs) and torch.equal(plain, windows[:, 1:])
    masked = plain[targets == -100].tolist()
    assert sorted(masked) == [8, 10, 13]  # the first token of every document after the first
    assert torch.equal(targets[targets != -100], plain[targets != -100])
    assert (inputs[targets == -100] == eos).all()
