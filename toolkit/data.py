"""Data: load (local files or hub) -> tokenize -> pack (text) or mask prompts (sft) -> batches.

Everything goes through `datasets` so tokenization is batched and cached on disk: the main
process tokenizes first (`accelerator.main_process_first()` in train.py) and the other ranks
read its cache.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import datasets
import torch
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader

from .config import DataConfig, UserError
from .demo_data import load_builtin
from .loss import IGNORE  # label value the loss skips (prompt tokens, padding)

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_source(source: str, split: str = "train") -> datasets.Dataset:
    """A local data file by extension, `builtin:NAME` (demo_data.py), or a hub dataset `name[:config]`."""
    path = Path(source)
    try:
        if source.startswith("builtin:"):
            ds = load_builtin(source.removeprefix("builtin:"))
        elif path.suffix in LOADERS:
            if not path.is_file():
                raise UserError(f"data file {source} does not exist: check the path")
            if path.suffix != ".parquet" and not has_content(path):
                raise UserError(f"data file {source} is empty: give a file with at least one document")
            # .txt: one document per paragraph (blank-line separated), the way plain text corpora are written.
            extra = {"sample_by": "paragraph"} if path.suffix == ".txt" else {}
            try:
                ds = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train", **extra)
            except Exception:
                if path.suffix == ".jsonl":
                    check_json_lines(path)  # datasets' own error names neither the line nor the problem
                raise
        elif path.exists():
            raise UserError(f"data {source}: unsupported file type; use one of {', '.join(LOADERS)}")
        else:
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files and unknown hub names
        raise UserError(f"cannot read data {source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None
    if len(ds) == 0:
        raise UserError(f"data {source} is empty: give a file with at least one document")
    return ds


def has_content(path: Path) -> bool:
    """Whether a text file holds anything but white space (read up to the first such line only)."""
    with path.open("rb") as f:
        return any(line.strip() for line in f)


def check_json_lines(path: Path) -> None:
    """Name the first line of a .jsonl file that is not a JSON object."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"data file {path} line {number} is not valid JSON ({e.msg} at column {e.colno}): "
                                "fix or remove that line") from None
            if not isinstance(record, dict):
                raise UserError(f"data file {path} line {number} is not a JSON object: write one object per line, "
                                'e.g. {"text": "..."}')


def load_raw(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) raw documents; held-out is `cfg.eval` or a seeded split of `cfg.train`."""
    train = load_source(cfg.train, cfg.split)
    if cfg.eval:
        return train, load_source(cfg.eval, cfg.eval_split)
    if len(train) < 2:
        raise UserError(f"data {cfg.train} has one document; give data.eval or more documents to hold some out")
    parts = train.train_test_split(test_size=max(1, round(len(train) * cfg.eval_fraction)), seed=seed)
    return parts["train"], parts["test"]


FIELDS_FIX = "rename the columns or set data.text_field / data.prompt_field / data.response_field"


def detect_format(ds: datasets.Dataset, cfg: DataConfig, fix: str = FIELDS_FIX) -> str:
    """text or sft, from the columns and data.format; `fix`: the error's advice (the caller's options)."""
    columns = set(ds.column_names)
    sft = {cfg.prompt_field, cfg.response_field} <= columns
    text = cfg.text_field in columns
    fmt = cfg.format if cfg.format != "auto" else "sft" if sft else "text" if text else None
    if fmt is None or (fmt == "sft" and not sft) or (fmt == "text" and not text):
        raise UserError(f"data has columns {sorted(columns)}; data.format={cfg.format} needs "
                        f"'{cfg.text_field}' (text) or '{cfg.prompt_field}'+'{cfg.response_field}' (sft): {fix}")
    return fmt


def check_block_size(block_size: int, max_positions: int, key: str = "data.block_size") -> None:
    """`key`: what the caller's user sets the length with."""
    if block_size > max_positions:
        raise UserError(f"{key}={block_size} is longer than the model allows ({max_positions} positions): "
                        f"set {key}<={max_positions}")


# datasets fingerprints a module-level function by its name (dill pickles it by reference), so
# a toolkit whose tokenizing or packing changed would silently reuse the caches of the old one.
PIPELINE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def cached_map(ds: datasets.Dataset, function, num_proc: int = 1, **kwargs) -> datasets.Dataset:
    """`ds.map` cached by the data set, the arguments and this module's code. `num_proc` (for functions
    of one example at a time, whose result does not depend on how the data is split) is not part
    of the cache key."""
    fingerprint = Hasher.hash([ds._fingerprint, function, kwargs, PIPELINE_VERSION])
    return ds.map(function, new_fingerprint=fingerprint, num_proc=num_proc if num_proc > 1 else None, **kwargs)


def tokenize_for_training(ds: datasets.Dataset, tokenizer, cfg: DataConfig, fmt: str) -> datasets.Dataset:
    """Text: documents tokenized, concatenated and cut into `block_size` blocks (the tail that does
    not fill a block is dropped). SFT: prompt+response per example, prompt labels masked."""
    if fmt == "text":
        ids = cached_map(ds, lambda b: {"input_ids": tokenizer(b[cfg.text_field])["input_ids"]}, batched=True,
                         remove_columns=ds.column_names, desc="tokenize", num_proc=cfg.num_proc)
        blocks = pack_stream(ids, cfg.block_size)
    else:
        blocks = cached_map(ds, _sft_example, batched=True, remove_columns=ds.column_names, desc="tokenize sft",
                            fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, num_proc=cfg.num_proc)
        if cfg.packing:
            blocks = cached_map(blocks, _pack_examples, batched=True, batch_size=10_000,
                                remove_columns=blocks.column_names, fn_kwargs={"block_size": cfg.block_size},
                                desc="pack sft")
    if len(blocks) == 0:
        raise UserError(f"data yields no training sequences of data.block_size={cfg.block_size}: "
                        "give more text or lower data.block_size")
    return blocks


def pack_stream(ids: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Every document's tokens end to end, cut into `block_size` blocks: only the stream's last,
    incomplete block is dropped. (A batched `map` packs each batch of 1000 documents on its own and
    drops a tail per batch.) One numpy pass over the token stream, a few bytes a token: seconds for
    10^8 tokens, so it needs no cache."""
    import pyarrow.compute as pc

    stream = pc.list_flatten(ids.with_format("arrow")["input_ids"]).to_numpy()
    usable = len(stream) - len(stream) % block_size
    return datasets.Dataset.from_dict({"input_ids": stream[:usable].reshape(-1, block_size)})


def _pack_examples(batch, block_size: int):
    """Whole examples into rows of at most `block_size` tokens, best-fit decreasing: longest first,
    each into the row it leaves the least room in (the built-in SFT tasks fill rows to 99%, against
    87% when examples fill rows in their order). `lengths` keeps where each example starts, so the
    collator can keep them apart. The training loader shuffles the rows."""
    order = sorted(range(len(batch["input_ids"])), key=lambda i: -len(batch["input_ids"][i]))  # stable
    rows = {"input_ids": [], "labels": [], "lengths": []}
    room = []  # (free tokens, row), sorted, for rows that can still take an example
    for i in order:
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        at = bisect.bisect_left(room, (len(ids), -1))  # the row with the least room that fits
        if at < len(room):
            free, row = room.pop(at)
        else:
            for key in rows:
                rows[key].append([])
            free, row = block_size, len(rows["lengths"]) - 1
        rows["input_ids"][row] += ids
        rows["labels"][row] += [IGNORE] + labels[1:]  # an example's first token is never predicted from the one before
        rows["lengths"][row].append(len(ids))
        if free > len(ids):
            bisect.insort(room, (free - len(ids), row))
    return rows


def _sft_example(batch, tokenizer, cfg: DataConfig):
    out = {"input_ids": [], "labels": []}
    for ids, labels, _ in _sft_tokens(batch, tokenizer, cfg, cfg.block_size):
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def _sft_tokens(batch, tokenizer, cfg: DataConfig, max_length: int):
    """(input_ids, labels, response) per example: prompt tokens masked, EOS ends the response,
    cut at `max_length`. An example whose prompt fills the window teaches nothing and is dropped."""
    prompts = tokenizer(batch[cfg.prompt_field])["input_ids"]
    responses = tokenizer(batch[cfg.response_field], add_special_tokens=False)["input_ids"]
    for prompt, response, text in zip(prompts, responses, batch[cfg.response_field]):
        response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE] * len(prompt) + response)[:max_length]
        if any(label != IGNORE for label in labels[1:]):
            yield ids, labels, text


def tokenize_for_eval(ds: datasets.Dataset, tokenizer, cfg: DataConfig, fmt: str, max_length: int,
                      stride: int | None = None) -> datasets.Dataset:
    """Each document scored on its own, in its own encoding (`tokenizer(text)`).

    Text documents longer than `max_length` are cut into overlapping windows that roll over the
    document (as lm-evaluation-harness and the transformers perplexity guide do): every token is
    predicted exactly once, with up to `max_length - stride` tokens of context from the window
    before. `n_bytes` and `documents` sit on a document's first window only so sums count each once.
    SFT examples are scored on their response tokens, like training."""
    stride = stride or max(1, max_length // 2)
    def fn(batch):
        out = {"input_ids": [], "labels": [], "n_bytes": [], "documents": []}
        if fmt == "sft":
            for ids, labels, response in _sft_tokens(batch, tokenizer, cfg, max_length):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["n_bytes"].append(len(response.encode()))
                out["documents"].append(1)
        else:
            for text, ids in zip(batch[cfg.text_field], tokenizer(batch[cfg.text_field])["input_ids"]):
                for i, (window, labels) in enumerate(rolling_windows(ids, max_length, stride)):
                    out["input_ids"].append(window)
                    out["labels"].append(labels)
                    out["n_bytes"].append(len(text.encode()) if i == 0 else 0)
                    out["documents"].append(1 if i == 0 else 0)
        return out
    windows = cached_map(ds, fn, batched=True, remove_columns=ds.column_names, desc="tokenize held-out",
                         num_proc=cfg.num_proc)
    if len(windows) == 0:
        raise UserError("held-out data has no scorable tokens: give documents with at least two tokens")
    return windows


def rolling_windows(ids: list[int], max_length: int, stride: int):
    """Yield (input_ids, labels) windows that predict each of ids[1:] exactly once."""
    scored = 1  # ids[0] (BOS) has no prediction
    while scored < len(ids):
        end = min(len(ids), scored + (max_length - 1 if scored == 1 else stride))
        start = max(0, end - max_length)
        window = ids[start:end]
        labels = [IGNORE] * (scored - start) + window[scored - start:]
        yield window, labels
        scored = end


class Collator:
    """Pads a list of examples to the longest one; labels default to input_ids, padding is ignored.

    A batch without padding has no attention_mask. Each batch also carries `num_targets`, the
    tokens its loss scores (labels after the causal shift that are not ignored), as a Python int:
    counted here, on the host, before the batch moves to the device, so the training loop never
    waits for the device to learn it."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "lengths" in examples[0]:
            return self.packed(examples)
        length = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            ids, pad = e["input_ids"], length - len(e["input_ids"])
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(list(e.get("labels", ids)) + [IGNORE] * pad)
        out = {k: torch.tensor(v) for k, v in batch.items()}
        for key in examples[0].keys() - out.keys():  # per-example counts for evaluation (n_bytes, ...)
            out[key] = torch.tensor([e[key] for e in examples])
        out["num_targets"] = count_targets(batch["labels"])
        if all(len(e["input_ids"]) == length for e in examples):
            # No padding (packed text): without a mask transformers takes the causal fast path, where with
            # one it would read the mask back from the device to find out that it may.
            del out["attention_mask"]
        return out


    def packed(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Rows of packed examples: each example attends causally to itself only and its positions
        start at 0, as if it were alone (the model takes a ready 4D mask, True = attend, and the
        position ids). Padding attends only to its row's first token, so no attention row is empty;
        real tokens are exactly the mask's diagonal (measure.count_tokens)."""
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id)
        labels = torch.full((len(rows), length), IGNORE)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            mask[i, 0, n:, 0] = True
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            start = 0
            for example_length in row["lengths"]:
                end = start + example_length
                position_ids[i, start:end] = torch.arange(example_length)
                mask[i, 0, start:end, start:end] = torch.ones(example_length, example_length, dtype=torch.bool).tril()
                start = end
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
                "num_targets": count_targets(row["labels"] for row in rows)}


def count_targets(rows) -> int:
    """Tokens the loss scores: labels after the causal shift that are not ignored (rows of label lists)."""
    return sum(label != IGNORE for labels in rows for label in labels[1:])


def train_dataloader(ds: datasets.Dataset, micro_batch_size: int, pad_token_id: int) -> DataLoader:
    # Shuffling order comes from accelerate's seedable sampler (seed + epoch), the same on every
    # rank and after a resume; drop_last keeps every optimizer step the same size.
    return DataLoader(ds, batch_size=micro_batch_size, shuffle=True, drop_last=True,
                      collate_fn=Collator(pad_token_id))


def eval_dataloader(ds: datasets.Dataset, micro_batch_size: int, pad_token_id: int) -> DataLoader:
    return DataLoader(ds, batch_size=micro_batch_size, shuffle=False, collate_fn=Collator(pad_token_id))
