import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from training.tokenizer import (
    SPECIAL_TOKENS,
    load_or_train_tokenizer,
    think_token_ids,
    token_byte_lengths,
    train_tokenizer,
)

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
    "Solution: 3 + 4 = 7\nAnswer: 7",
    "Question: Calculate 12 * 11.\nAnswer: 132",
    "π ≈ 3.14159, a naïve café owner studies 数学 every day.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_roundtrip_with_specials_and_unicode(tokenizer):
    text = (
        "<|bos|>Question: 2+2?\n<think>two and two make four</think>Answer: 4<|eos|>"
        "  π ≈ 3.14, naïve, 数学 🙂 \t end . ,<|pad|>"
    )
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_each_special_token_is_one_id(tokenizer):
    for token in SPECIAL_TOKENS.values():
        ids = tokenizer.encode(token)
        assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.bos_token == SPECIAL_TOKENS["bos"]
    assert tokenizer.eos_token == SPECIAL_TOKENS["eos"]
    assert tokenizer.pad_token == SPECIAL_TOKENS["pad"]
    think, end_think = think_token_ids(tokenizer)
    assert tokenizer.encode("<think>x</think>")[0] == think
    assert tokenizer.encode("<think>x</think>")[-1] == end_think
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, think, end_think}) == 5


def test_encode_adds_no_specials(tokenizer):
    ids = tokenizer("Answer: 7")["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_save_reload_same_ids(tokenizer, tmp_path):
    text = "Question: <think>π ≈ 3.14</think> naïve 数学\nAnswer: 7<|eos|>"
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.decode(reloaded.encode(text)) == text
    assert think_token_ids(reloaded) == think_token_ids(tokenizer)
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_load_or_train_reuses_saved(tmp_path):
    path = tmp_path / "tok"
    first = load_or_train_tokenizer(path, lambda: CORPUS, vocab_size=400)
    assert (path / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    def must_not_train():
        raise AssertionError("trained again instead of loading the saved tokenizer")

    second = load_or_train_tokenizer(path, must_not_train, vocab_size=400)
    text = "Answer: <think>3 + 4</think> 7, naïve 数学"
    assert second.encode(text) == first.encode(text)
    assert len(second) == len(first)


def test_token_byte_lengths(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (len(tokenizer),)
    for text in ["Question: 3 + 4 = 7", "π ≈ 3.14, naïve, 数学 🙂", "unseen WORDS\n\n  x"]:
        ids = tokenizer.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert all(int(lengths[i]) == 0 for i in tokenizer.all_special_ids)
    assert int(lengths.min()) == 0 and int(lengths[tokenizer.encode("a")[0]]) == 1
