"""Tiny models and data for the evaluation tests (tests/test_evaluation.py, tests/test_cli_eval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from moekit import MoELM
from moekit.data.stdlib_corpus import stdlib_root

#: standard-library files present in every Python 3 (their first bytes are the test documents)
SOURCES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "colorsys.py")


def text_documents(count: int = 4, size: int = 2500) -> list[bytes]:
    """``count`` different texts of different lengths, at most ``size`` bytes (Python source)."""
    return [(stdlib_root() / name).read_bytes()[: size - 250 * i] for i, name in enumerate(SOURCES[:count])]


def text_files(directory: Path, count: int = 4, size: int = 2500) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(text_documents(count, size)):
        path = directory / f"doc{i}.py"
        path.write_bytes(text)
        paths.append(path)
    return paths


def tiny_lm(seed: int = 0, max_seq_len: int = 64) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(dim=16, depth=1, heads=2, num_experts=2, k=1, hidden=16, max_seq_len=max_seq_len).eval()


class MemorisedLM(nn.Module):
    """A byte-level "model" that memorised ``texts``: it predicts the byte that followed the last
    ``order`` bytes there (by counts), and is uniform on contexts it never saw. Same contract as
    ``MoELM``: ``forward(tokens [B, S]) -> (logits [B, S, 256], [])``."""

    def __init__(self, texts: Sequence[bytes], order: int = 12, max_seq_len: int = 64) -> None:
        super().__init__()
        self.order, self.max_seq_len, self.vocab_size = order, max_seq_len, 256
        self.table: dict[bytes, Tensor] = {}
        for text in texts:
            for i in range(order, len(text)):
                counts = self.table.setdefault(text[i - order : i], torch.zeros(256))
                counts[text[i]] += 1

    def forward(self, tokens_BS: Tensor) -> tuple[Tensor, list]:
        B, S = tokens_BS.shape
        logits = torch.zeros(B, S, 256)
        rows = tokens_BS.tolist()
        for b in range(B):
            for t in range(self.order - 1, S):
                counts = self.table.get(bytes(rows[b][t - self.order + 1 : t + 1]))
                if counts is not None:
                    logits[b, t] = torch.log(counts + 1e-3)
        return logits, []


def byte_tokenizer():
    """A Hugging Face fast tokenizer whose ids are the UTF-8 bytes (byte-level BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)
