"""The ``text-jsonl`` dataset: samples cut from a token stream, next-token targets, the held-out
tail, byte-level and tokenizer.json tokenizers, and bad files refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isthmus.data import DataError
from isthmus.data.text import ByteTokenizer, text_jsonl

BASE = {"name": "text-jsonl", "path": None, "tokenizer": "byte", "text_key": "text", "seq_len": 16,
        "eval_fraction": 0.1, "num_train": None, "num_eval": None}


def lines(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def test_samples_are_windows_of_the_stream_with_next_token_targets(tmp_path):
    texts = ["hello world, " * 5, "ünïcödé text " * 4, "a third line of words " * 3]
    data = text_jsonl({**BASE, "path": lines(tmp_path / "t.jsonl", texts)})
    tok = ByteTokenizer()
    stream = [i for t in texts for i in (*t.encode("utf-8"), tok.eos_id)]
    count = (len(stream) - 1) // 16
    assert len(data.train) + len(data.eval) == count and len(data.eval) == round(count * 0.1)
    batch = data.train.batch([0, 2])
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int64 and batch["tokens"].shape == (2, 16)
    assert batch["tokens"][1].tolist() == stream[32:48] and batch["targets"][1].tolist() == stream[33:49]
    held = data.eval.batch([len(data.eval) - 1])
    assert held["targets"][0].tolist() == stream[16 * (count - 1) + 1:16 * count + 1]  # the tail is held out
    assert data.train.tokens_per_sample == 16 and data.tokenizer.vocab_size == 258
    assert tok.decode(tok.encode(texts[1])) == texts[1]


def test_the_built_in_text_and_a_restored_tokenizer(tmp_path):
    data = text_jsonl(BASE)
    assert len(data.train) > 100 and data.state() == {"tokenizer": {"type": "byte"}}
    again = text_jsonl({**BASE, "tokenizer": "ignored when a checkpoint saved one"}, data.state())
    assert np.array_equal(again.train.batch([3])["tokens"], data.train.batch([3])["tokens"])


def test_a_tokenizer_json_is_used_and_its_specials_read(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate("the river runs to sea".split())}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    data = text_jsonl({**BASE, "seq_len": 4, "tokenizer": str(tmp_path / "tokenizer.json"),
                       "path": lines(tmp_path / "t.jsonl", ["the river runs to the sea"] * 3)})
    assert data.tokenizer.vocab_size == 8 and data.tokenizer.eos_id == 1 and data.tokenizer.bos_id == 0
    assert data.train.batch([0])["tokens"][0].tolist() == [3, 4, 5, 6]
    assert data.tokenizer.decode([3, 4]) == "the river"
    saved = data.state()
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text().replace('"sea"', '"sky"'))
    with pytest.raises(DataError, match="changed since the checkpoint was made"):
        text_jsonl(BASE, saved)


@pytest.mark.parametrize("content, expected", [
    ('{"text": "fine"}\nnot json\n', ":2: not valid JSON"),
    ('{"body": "no text key"}\n', ":1: expected an object with a string 'text'"),
    ('{"text": "short"}\n', "make 0 sample(s) of data.seq_len=16"),
])
def test_bad_files_are_one_line_naming_the_place(tmp_path, content, expected):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(DataError) as caught:
        text_jsonl({**BASE, "path": str(tmp_path / "t.jsonl")})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError, match="no such file"):
        text_jsonl({**BASE, "path": str(tmp_path / "missing.jsonl")})
