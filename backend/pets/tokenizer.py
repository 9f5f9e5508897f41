"""Server-side tokenization of TEXT inputs with HF ``tokenizers``."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(checkpoint: Path | str, max_len: int) -> Tokenizer | None:
    """The checkpoint's ``tokenizer.json``, truncating to ``max_len`` tokens ([CLS] and [SEP]
    included), or ``None`` when the backbone ships no tokenizer (TEXT is then refused)."""
    if not isinstance(checkpoint, Path) or not (checkpoint / "tokenizer.json").is_file():
        return None
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok
