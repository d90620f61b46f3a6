"""Data: load (local files or hub) -> tokenize -> pack (text) or mask prompts (sft, alpaca, chat) -> batches.

Each `data.train` source keeps its own format (detected from its columns) and weight; the sources
are mixed after tokenizing, so sft, alpaca and chat data pack into the same rows.

Everything goes through `datasets` so tokenization is batched and cached on disk: the main
process tokenizes first (`accelerator.main_process_first()` in train.py) and the other ranks
read its cache.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from pathlib import Path
from typing import NamedTuple

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


class Part(NamedTuple):
    """One data source: its raw rows, their format, and its weight in the training mix."""
    name: str
    format: str
    rows: datasets.Dataset
    weight: float = 1.0


def load_part(source: str, cfg: DataConfig, split: str, fix: str | None = None) -> Part:
    rows = load_source(source, split)
    return Part(source, detect_format(rows, cfg, source, fix or FIELDS_FIX), rows)


def load_raw(cfg: DataConfig, seed: int) -> tuple[list[Part], list[Part]]:
    """(training, held-out) parts: a part per `data.train` source with its weight; held out is
    `data.eval`, or a seeded `eval_fraction` of each source, so each is scored."""
    train, held_out = [], []
    for source, weight in cfg.sources():
        part = load_part(source, cfg, cfg.split)
        if not cfg.eval:
            if len(part.rows) < 2:
                raise UserError(f"data {source} has one document; give data.eval or more documents to hold some out")
            split = part.rows.train_test_split(test_size=max(1, round(len(part.rows) * cfg.eval_fraction)), seed=seed)
            held_out.append(part._replace(rows=split["test"]))
            part = part._replace(rows=split["train"])
        train.append(part._replace(weight=weight))
    if cfg.eval:
        held_out.append(load_part(cfg.eval, cfg, cfg.eval_split))
    check_one_kind(train)
    return train, held_out


def check_one_kind(parts: list[Part]) -> None:
    """Text is packed into blocks of documents and trains on every token; the other formats train on
    responses only: one training set holds one kind."""
    if len({p.format == "text" for p in parts}) > 1:
        text = [p.name for p in parts if p.format == "text"]
        raise UserError(f"data.train mixes text sources ({', '.join(text)}) with instruction or chat sources: "
                        "train them in separate runs (e.g. text first, then resume=... with the others)")


FIELDS_FIX = "rename the columns or set data.format / data.text_field / data.prompt_field / data.response_field"
CHAT_COLUMNS = ("messages", "conversations")  # role/content messages; sharegpt's from/value turns


def detect_format(ds: datasets.Dataset, cfg: DataConfig, source: str = "", fix: str = FIELDS_FIX) -> str:
    """The format of a source's rows: data.format, or the first whose columns are there
    (chat, alpaca, sft, text); `fix`: the error's advice (the caller's options)."""
    columns = set(ds.column_names)
    present = {"chat": bool(columns & set(CHAT_COLUMNS)), "alpaca": {"instruction", "output"} <= columns,
               "sft": {cfg.prompt_field, cfg.response_field} <= columns, "text": cfg.text_field in columns}
    fmt = cfg.format if cfg.format != "auto" else next((f for f, found in present.items() if found), None)
    if fmt is None or not present[fmt]:
        raise UserError(f"data {source + ' ' if source else ''}has columns {sorted(columns)}; data.format="
                        f"{cfg.format} needs '{cfg.text_field}' (text), '{cfg.prompt_field}'+'{cfg.response_field}' "
                        f"(sft), 'instruction'+'output' (alpaca) or 'messages'/'conversations' (chat): {fix}")
    return fmt


def weighted(rows: datasets.Dataset, weight: float, seed: int) -> datasets.Dataset:
    """`weight` times the rows: each whole time all of them, the fraction a seeded sample."""
    if weight == 1:
        return rows
    whole, fraction = divmod(weight, 1)
    picks = list(range(len(rows))) * int(whole)
    picks += sorted(random.Random(seed).sample(range(len(rows)), round(fraction * len(rows))))
    return rows.select(picks)


def plain_texts(parts: list[Part], cfg: DataConfig):
    """Every example's strings (a preset's tokenizer is trained on them)."""
    for part in parts:
        for batch in part.rows.iter(batch_size=1000):
            if part.format == "text":
                yield from batch[cfg.text_field]
            elif part.format == "chat":
                yield from ("\n".join(m["content"] for m in to_messages(c)) for c in batch[chat_column(batch)])
            else:
                yield from (p + r for p, r in prompts_and_responses(batch, part.format, cfg))


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


def tokenize_for_training(parts: list[Part], tokenizer, cfg: DataConfig, seed: int = 0) -> datasets.Dataset:
    """Text: documents tokenized, concatenated and cut into `block_size` blocks (the tail that does
    not fill a block is dropped). Others: one example per row (prompt labels masked, EOS after each
    response), packed into rows if `data.packing`. Each part is repeated or sampled by its weight."""
    check_one_kind(parts)
    template = chat_template(tokenizer, cfg) if any(p.format == "chat" for p in parts) else ""
    if parts[0].format == "text":
        def encode(batch):
            return {"input_ids": tokenizer(batch[cfg.text_field])["input_ids"]}
        ids = datasets.concatenate_datasets([
            cached_map(weighted(p.rows, p.weight, seed), encode, batched=True, remove_columns=p.rows.column_names,
                       desc="tokenize", num_proc=cfg.num_proc) for p in parts])
        blocks = pack_stream(ids, cfg.block_size)
    else:
        blocks = datasets.concatenate_datasets([
            cached_map(weighted(p.rows, p.weight, seed), _supervised_example, batched=True,
                       remove_columns=p.rows.column_names, desc=f"tokenize {p.format}", num_proc=cfg.num_proc,
                       fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "fmt": p.format, "template": template})
            for p in parts])
        if cfg.packing:
            blocks = cached_map(blocks, _pack_examples, batched=True, batch_size=10_000,
                                remove_columns=blocks.column_names, fn_kwargs={"block_size": cfg.block_size},
                                desc="pack")
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


def _supervised_example(batch, tokenizer, cfg: DataConfig, fmt: str, template: str):
    out = {"input_ids": [], "labels": []}
    for ids, labels, _ in supervised_tokens(batch, tokenizer, cfg, fmt, template, cfg.block_size):
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def supervised_tokens(batch, tokenizer, cfg: DataConfig, fmt: str, template: str, max_length: int):
    """(input_ids, labels, trained text) per example of sft, alpaca or chat data: only responses
    (assistant turns) carry labels, each followed by EOS; cut at `max_length`. An example left
    with nothing to learn (its prompt fills the window) is dropped."""
    if fmt == "chat":
        examples = chat_tokens(batch[chat_column(batch)], tokenizer, template)
    else:
        examples = prompt_response_tokens(batch, tokenizer, cfg, fmt)
    for ids, labels, text in examples:
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels[1:]):
            yield ids, labels, text


def prompt_response_tokens(batch, tokenizer, cfg: DataConfig, fmt: str):
    prompts, responses = zip(*prompts_and_responses(batch, fmt, cfg))
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    for prompt, response, text in zip(prompt_ids, response_ids, responses):
        response = response + [tokenizer.eos_token_id]
        yield prompt + response, [IGNORE] * len(prompt) + response, text


# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca), which alpaca-style data sets and
# the models tuned on them expect; `input` is optional.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def prompts_and_responses(batch, fmt: str, cfg: DataConfig):
    """(prompt, response) per row of sft or alpaca data (sft: the fields as they are)."""
    if fmt == "sft":
        return zip(batch[cfg.prompt_field], batch[cfg.response_field])
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    prompts = [(ALPACA_PROMPT_WITH_INPUT if context else ALPACA_PROMPT).format(instruction=instruction, input=context)
               for instruction, context in zip(batch["instruction"], inputs)]
    return zip(prompts, batch["output"])


# OPT ships no chat template. This one marks each assistant reply (and its EOS, so the model learns
# to stop) as {% generation %}: transformers' assistant mask then says which tokens carry loss.
# (The newlines after a block tag are an expression: transformers renders with trim_blocks.)
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}")
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_template(tokenizer, cfg: DataConfig) -> str:
    """data.chat_template (text or a file), else the tokenizer's own, else the toolkit's for OPT."""
    template = cfg.chat_template
    if template and "{" not in template:
        path = Path(template)
        if not path.is_file():
            raise UserError(f"data.chat_template={template} is neither a Jinja template nor an existing file")
        template = path.read_text()
    template = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if not GENERATION_BLOCK.search(template):
        raise UserError("the chat template does not mark assistant replies, so the loss can't be limited to them: "
                        "set data.chat_template to one with {% generation %}...{% endgeneration %} around each reply")
    return template


def chat_column(batch) -> str:
    return next(c for c in CHAT_COLUMNS if c in batch)


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(turns: list[dict]) -> list[dict]:
    """role/content messages, from themselves or from sharegpt's from/value turns (human, gpt, system)."""
    messages = []
    for turn in turns:
        if turn.get("role") is not None:
            messages.append({"role": turn["role"], "content": turn.get("content") or ""})
        elif turn.get("from") in ROLES:
            messages.append({"role": ROLES[turn["from"]], "content": turn.get("value") or ""})
        else:
            raise UserError(f"chat turn {dict(turn)} has neither a role nor a sharegpt 'from' of "
                            f"{', '.join(ROLES)}: fix the data")
    return messages


def chat_tokens(conversations, tokenizer, template: str):
    """Each conversation through the chat template; labels on the assistant-marked tokens."""
    import jinja2

    conversations = [to_messages(c) for c in conversations]
    try:
        out = tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template failed on the data: {e}") from None
    for messages, ids, mask in zip(conversations, out["input_ids"], out["assistant_masks"]):
        labels = [token if trained else IGNORE for token, trained in zip(ids, mask)]
        yield ids, labels, "".join(m["content"] for m in messages if m["role"] == "assistant")


def tokenize_for_eval(parts: list[Part], tokenizer, cfg: DataConfig, max_length: int,
                      stride: int | None = None) -> datasets.Dataset:
    """Each document scored on its own, in its own encoding (`tokenizer(text)`).

    Text documents longer than `max_length` are cut into overlapping windows that roll over the
    document (as lm-evaluation-harness and the transformers perplexity guide do): every token is
    predicted exactly once, with up to `max_length - stride` tokens of context from the window
    before. `n_bytes` and `documents` sit on a document's first window only so sums count each once.
    Examples of the other formats are scored on their responses, like training."""
    stride = stride or max(1, max_length // 2)
    template = chat_template(tokenizer, cfg) if any(p.format == "chat" for p in parts) else ""

    def fn(batch, fmt):
        out = {"input_ids": [], "labels": [], "n_bytes": [], "documents": []}
        if fmt != "text":
            for ids, labels, response in supervised_tokens(batch, tokenizer, cfg, fmt, template, max_length):
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
    windows = datasets.concatenate_datasets([
        cached_map(p.rows, fn, batched=True, remove_columns=p.rows.column_names, fn_kwargs={"fmt": p.format},
                   desc="tokenize held-out", num_proc=cfg.num_proc) for p in parts])
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

    def __init__(self, pad_token_id: int, attn_implementation: str = "sdpa"):
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation

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
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
                 "num_targets": count_targets(row["labels"] for row in rows)}
        # transformers passes a 4D mask to the attention as it is: SDPA takes booleans, eager adds
        # it to the scores, and flash-attention takes none (it finds examples where positions restart at 0).
        if self.attn_implementation == "eager":
            batch["attention_mask"] = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        elif self.attn_implementation == "flash_attention_2":
            del batch["attention_mask"]
        return batch


def count_targets(rows) -> int:
    """Tokens the loss scores: labels after the causal shift that are not ignored (rows of label lists)."""
    return sum(label != IGNORE for labels in rows for label in labels[1:])


def train_dataloader(ds: datasets.Dataset, micro_batch_size: int, pad_token_id: int,
                     attn_implementation: str = "sdpa") -> DataLoader:
    # Shuffling order comes from accelerate's seedable sampler (seed + epoch), the same on every
    # rank and after a resume; drop_last keeps every optimizer step the same size.
    return DataLoader(ds, batch_size=micro_batch_size, shuffle=True, drop_last=True,
                      collate_fn=Collator(pad_token_id, attn_implementation))


def eval_dataloader(ds: datasets.Dataset, micro_batch_size: int, pad_token_id: int) -> DataLoader:
    return DataLoader(ds, batch_size=micro_batch_size, shuffle=False, collate_fn=Collator(pad_token_id))
