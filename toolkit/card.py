"""The model card (README.md) of an exported model directory: what it was trained from, on what,
how, its held-out results, and how to load it, as the Hugging Face Hub shows a model's README."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import RunConfig, to_dict
from .shapes import PRESETS


def model_card(cfg: RunConfig, step: int, metrics: Path, adapter: bool) -> str:
    """The card of a model trained by the run `cfg` to optimizer `step`; held-out results from the
    run's `metrics` file (evaluations up to `step`, if it is there); `adapter`: the directory holds a
    LoRA adapter (its full model, if merged, in merged/)."""
    base = cfg.model.name_or_path
    preset = base in PRESETS
    from_hub = not preset and not Path(base).exists()
    front = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
             "tags": ["opt", "fine-tuned", *(["lora"] if adapter else [])]}
    if from_hub:
        front["base_model"] = base
    run = cfg.runtime
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.output_dir).name}", "",
             f"Fine-tuned from `{base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
             + (" (a randomly initialised preset of the toolkit)" if preset else "")
             + f" for {step} optimizer steps"
             + (f" with LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha}, on {', '.join(cfg.lora.target_modules)})"
                if adapter else "") + ".", "",
             "## Data", "",
             *(f"- training: `{source}`" + (f" (split `{cfg.data.split}`)" if cfg.data.split else "")
               + (f", weight {weight:g}" if cfg.data.weights else "") for source, weight in cfg.data.sources()),
             f"- held out: `{cfg.data.eval}`" if cfg.data.eval
             else f"- held out: {cfg.data.eval_fraction:.0%} of the training documents",
             f"- format: {run.get('data_format', cfg.data.format)}, blocks of {cfg.data.block_size} tokens"
             + (", packed" if cfg.data.packing else ""), "",
             "## Training", "",
             f"- {run.get('distributed_type', '?')} on {run.get('num_processes', '?')} processes, mixed precision "
             f"{run.get('mixed_precision', '?')}; global batch {run.get('global_batch_size', '?')} sequences "
             f"({cfg.train.micro_batch_size} per process x {cfg.train.grad_accum_steps} accumulation steps)",
             f"- {cfg.optim.name}, lr {cfg.optim.lr}, {cfg.optim.scheduler} schedule, {cfg.optim.warmup_steps} warm-up "
             f"steps, weight decay {cfg.optim.weight_decay}", "",
             *_results(metrics, step),
             "## How to load", "", "```python", *_loading(adapter, base, from_hub),
             *(_chatting() if "chat" in run.get("data_format", "") else []), "```", "",
             "<details><summary>The run config</summary>", "", "```yaml",
             yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k != "runtime"}, sort_keys=False).strip(),
             "```", "", "</details>", ""]
    return "\n".join(lines)


def _results(metrics: Path, step: int) -> list[str]:
    from .telemetry import read_metrics

    evals = [r for r in read_metrics(metrics) if "eval_loss" in r and r["step"] <= step]
    if not evals:
        return []
    last = {r["step"]: r for r in evals}  # a step evaluated again after a resume: its latest record
    rows = [f"| {s} | {r['eval_loss']:.4f} | {r['eval_perplexity']:.2f} |" for s, r in sorted(last.items())]
    return ["## Held-out results", "", "| step | loss | perplexity |", "|---|---|---|", *rows, ""]


def _loading(adapter: bool, base: str, from_hub: bool) -> list[str]:
    if not adapter:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")']
    where = f'"{base}"' if from_hub else '"path/to/the/base/model"'
    return ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"base = AutoModelForCausalLM.from_pretrained({where})",
            'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            "# or, if the run merged the adapter: AutoModelForCausalLM.from_pretrained(\"path/to/this/directory/merged\")"]


def _chatting() -> list[str]:
    return ["", "# trained on conversations: prompt it through the chat template it was trained with",
            'messages = [{"role": "user", "content": "..."}]',
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, '
            'return_tensors="pt")',
            'reply = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]',
            "print(tokenizer.decode(reply, skip_special_tokens=True))"]
