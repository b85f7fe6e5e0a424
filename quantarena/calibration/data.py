"""Text sources -> token windows.

Sources: ``pydoc`` (default: the Python reference topics that ship with CPython), a ``.txt``
file, a ``.jsonl`` file (``path.jsonl:field`` picks the field, default ``text``), or a folder
written by ``datasets.Dataset.save_to_disk`` (``folder:field``).

Every window is ``seq_len`` tokens and starts with BOS. The token stream is split in two
halves: calibration windows come from the first, evaluation windows from the second, so they
never overlap when both come from the same source.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_SOURCE = "pydoc"


class TextError(ValueError):
    """A text source that is missing, empty or too short."""


def _split_field(source: str) -> tuple[str, str]:
    # "path.jsonl:field" -> (path, field); a Windows drive letter or plain path has no field
    path, sep, fld = source.rpartition(":")
    if sep and path and "/" not in fld and not Path(source).exists():
        return path, fld
    return source, "text"


def load_text(source: str | None = None) -> str:
    """Read a text source into one string (documents joined by blank lines)."""
    source = source or DEFAULT_SOURCE
    if source == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    path_str, fld = _split_field(source)
    path = Path(path_str).expanduser()
    if not path.exists():
        raise TextError(f"text source {path_str!r} does not exist; give 'pydoc', a .txt, a .jsonl or a saved datasets folder")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise TextError("reading a datasets folder needs the 'datasets' package: pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        if fld not in ds.column_names:
            raise TextError(f"field {fld!r} not in {path}; columns: {', '.join(ds.column_names)} (use {path}:FIELD)")
        text = "\n\n".join(str(t) for t in ds[fld] if t)
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if fld not in row:
                raise TextError(f"{path}:{n} has no field {fld!r}; fields: {', '.join(row)} (use {path}:FIELD)")
            docs.append(str(row[fld]))
        text = "\n\n".join(docs)
    else:
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise TextError(f"text source {source!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, int64 [n]."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def windows(tokenizer, text: str, seq_len: int = 512, num_windows: int = 8, part: str = "eval",
            bos_token_id: int | None = None) -> torch.Tensor:
    """``[num_windows, seq_len]`` windows, BOS first, from the ``calib`` (first) or ``eval`` (second) half,
    or from ``all`` of the stream.

    Fewer windows than asked are returned when the text is short (at least one); none is an error.
    """
    if seq_len < 2:
        raise TextError(f"window length must be at least 2 tokens, got {seq_len}")
    bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
    if bos is None:
        raise TextError("the tokenizer has no BOS token; pass bos_token_id")
    ids = tokenize(tokenizer, text)
    half = len(ids) // 2
    stream = {"calib": ids[:half], "eval": ids[half:], "all": ids}.get(part)
    if stream is None:
        raise TextError(f"unknown part {part!r}; use calib, eval or all")
    body = seq_len - 1
    available = len(stream) // body
    if available < 1:
        where = "the text" if part == "all" else f"the {'first' if part == 'calib' else 'second'} half of the text"
        raise TextError(f"text too short: {where} has {len(stream)} tokens, a window needs {body}; "
                        f"give more text or a smaller --seq-len")
    n = min(num_windows, available)
    chunks = stream[: n * body].reshape(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)


def random_windows(vocab_size: int, seq_len: int, num_windows: int, seed: int = 0) -> torch.Tensor:
    """Random token windows for models without a tokenizer (presets)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_windows, seq_len), generator=g)
