"""What the peers share: the job's arguments, its data as run_clm_no_trainer.py prepares it, and
the result file. No toolkit code here: the peers are what a user would write without it."""

import argparse
import json
import time
from itertools import chain
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoTokenizer, OPTConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_config", required=True, help="JSON file of OPTConfig fields")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="JSONL with a `text` field")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--result", required=True, help="JSON file to write the step end times to")
    return parser.parse_args()


def model_config(args) -> OPTConfig:
    return OPTConfig(**json.loads(Path(args.model_config).read_text()))


def clm_dataset(args):
    """Tokenize, concatenate, cut into block_size blocks; labels = input_ids (run_clm's group_texts)."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    raw = load_dataset("json", data_files=args.data, split="train")
    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=raw.column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // args.block_size * args.block_size
        result = {k: [t[i:i + args.block_size] for i in range(0, total, args.block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True)


class StepClock:
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times, self.losses = [], []

    def tick(self, loss=None):
        self.times.append(time.time())
        if loss is not None:
            self.losses.append(loss)

    def write(self, args, world_size: int) -> None:
        losses = [float(x) for x in self.losses]
        Path(args.result).write_text(json.dumps({
            "step_end_times": self.times, "losses": losses, "world_size": world_size,
            "tokens_per_step": args.micro_batch_size * args.block_size * world_size,
            "threads": torch.get_num_threads()}))
