"""The token batch validation is measured on: real text when the models carry a tokenizer, else seeded ids.

Real text is the built-in set (weightdiff/data/eval_texts.jsonl: prose, code and chat, see its README) or the
user's `validate.texts`: a .jsonl file of {"text": ...} or {"messages": [...]} records, or a plain .txt file.
Chat records are rendered with the tokenizer's chat template when it has one. Records are shuffled (seeded)
so that every kind reaches the evaluated windows, then tokenized, concatenated and cut into
`batch_size` windows of `seq_len` tokens: teacher-forced, no sampling.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from weightdiff.errors import WeightdiffError

BUILTIN = Path(__file__).parent / "data" / "eval_texts.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in TOKENIZER_FILES)


def read_records(path: Path) -> list[dict]:
    """Records of a texts file; an unreadable, empty or malformed one is an error naming the file and line."""
    if not path.is_file():
        raise WeightdiffError(f"validate.texts: {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        records = [{"text": text}] if text.strip() else []
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise WeightdiffError(f"{path}:{number}: not a JSON object ({e})") from e
            if not isinstance(record, dict) or not (
                isinstance(record.get("text"), str) or isinstance(record.get("messages"), list)
            ):
                raise WeightdiffError(
                    f'{path}:{number}: expected {{"text": "..."}} or {{"messages": [...]}}, found {line[:80]!r}'
                )
            records.append(record)
    if not records:
        raise WeightdiffError(f"validate.texts: {path} holds no text")
    return records


def record_ids(record: dict, tokenizer) -> list[int]:
    if "messages" not in record:
        return tokenizer(record["text"])["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=False))
    return tokenizer("\n\n".join(f"{m['role']}: {m['content']}" for m in record["messages"]))["input_ids"]


def text_batch(
    path: Path, tokenizer_dir: Path, vocab_size: int, batch_size: int, seq_len: int, seed: int
) -> torch.Tensor:
    """[batch_size, seq_len] token ids of real text, or an error naming the file and the numbers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records = read_records(path)
    random.Random(seed).shuffle(records)
    ids = [i for record in records for i in record_ids(record, tokenizer)]
    needed = batch_size * seq_len
    if len(ids) < needed:
        raise WeightdiffError(
            f"{path}: {len(ids)} tokens with the tokenizer of {tokenizer_dir}, fewer than "
            f"validate.batch_size × validate.seq_len = {batch_size} × {seq_len} = {needed}: "
            "give more text or ask for less"
        )
    top = max(ids[:needed])
    if top >= vocab_size or len(tokenizer) > vocab_size:
        raise WeightdiffError(
            f"the tokenizer of {tokenizer_dir} does not fit the model: it has {len(tokenizer)} tokens "
            f"(ids up to {top} in {path}), the model's vocab_size is {vocab_size}"
        )
    return torch.tensor(ids[:needed]).view(batch_size, seq_len)


def seeded_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """For checkpoints without a tokenizer (synthetic test models)."""
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


def evaluation_batch(model_dir: Path, vocab_size: int, settings) -> tuple[torch.Tensor, str]:
    """(token ids, where they came from: the texts file, or 'seeded ids')."""
    texts = settings.texts
    if texts is None and not has_tokenizer(model_dir):
        return seeded_batch(vocab_size, settings.batch_size, settings.seq_len, settings.seed), "seeded ids"
    if not has_tokenizer(model_dir):
        raise WeightdiffError(
            f"validate.texts={texts} needs a tokenizer, and {model_dir} has none of {', '.join(TOKENIZER_FILES)}"
        )
    path = Path(texts) if texts is not None else BUILTIN
    return text_batch(path, model_dir, vocab_size, settings.batch_size, settings.seq_len, settings.seed), str(
        texts or "built-in"
    )
