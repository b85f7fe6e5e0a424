import json

import pytest

from quantarena.calibration import data


class CharTokenizer:
    """A stand-in tokenizer: one token per character, BOS = 1."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        class Out:
            input_ids = [ord(c) % 200 + 2 for c in text]
        return Out()


def test_pydoc_default_corpus():
    text = data.load_text()
    assert len(text) > 300_000 and "for_stmt" not in text[:0]


def test_windows_bos_and_no_overlap():
    tok = CharTokenizer()
    text = "".join(chr(65 + i % 26) for i in range(10_000))
    cal = data.windows(tok, text, 100, 50, "calib")
    ev = data.windows(tok, text, 100, 50, "eval")
    assert (cal[:, 0] == 1).all() and (ev[:, 0] == 1).all()
    assert cal.shape == (50, 100) and ev.shape == (50, 100)
    # calibration windows come from the first half of the token stream, evaluation from the second
    ids = data.tokenize(tok, text)
    assert (cal[:, 1:].flatten() == ids[:50 * 99]).all()
    assert (ev[:, 1:].flatten() == ids[5000:5000 + 50 * 99]).all()
    assert 50 * 99 <= 5000


def test_txt_jsonl_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert data.load_text(str(tmp_path / "a.txt")) == "hello world"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert data.load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert data.load_text(str(tmp_path / "b.jsonl") + ":body") == "uno\n\ndos"
    with pytest.raises(data.TextError, match="no field 'nope'"):
        data.load_text(str(tmp_path / "b.jsonl") + ":nope")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.TextError, match="is empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(data.TextError, match="does not exist"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(data.TextError, match="too short"):
        data.windows(CharTokenizer(), "short", 100, 4, "eval")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package is optional")
    datasets.Dataset.from_dict({"content": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert data.load_text(str(tmp_path / "ds") + ":content") == "alpha\n\nbeta"
