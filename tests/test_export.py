"""The exporter on one process: the files it writes from a stream of weights, whatever their number
of shards, load with plain transformers and equal what they were made from; a merged LoRA model
equals peft's own merge. (Under every strategy, and its memory: test_strategies.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_opt
from toolkit import config as config_lib, export
from toolkit.card import model_card
from toolkit.config import LoraConfig, UserError
from toolkit.model import apply_lora, train_bpe_tokenizer


CARD = "# a model card\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["a small text to learn a vocabulary from"] * 10, vocab_size=300)


def test_shards_fill_to_the_size_asked_and_load_with_plain_transformers(tokenizer, tmp_path):
    model = tiny_opt()
    export.write_hf_model(model, model.named_parameters(), tokenizer, tmp_path / "out", step=3, card=CARD,
                          max_shard_size="300KB")
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    # each file holds at most the size asked, unless one tensor alone is larger (then alone)
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard.name]
        assert shard.stat().st_size < 300_000 + 10_000 or len(names) == 1, (shard, names)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert set(index["weight_map"]) == set(model.state_dict()) - {"lm_head.weight"}  # tied: one copy
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert json.loads((out / export.INFO_FILE).read_text()) == {"step": 3}


def test_one_shard_is_model_safetensors_in_the_dtype_asked(tokenizer, tmp_path):
    model = tiny_opt()
    export.write_hf_model(model, model.named_parameters(), tokenizer, tmp_path / "out", step=1, card=CARD, dtype="bf16")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16)), name


def test_a_merge_layer_by_layer_equals_peft_merge_and_unload(tokenizer, tmp_path):
    lora = apply_lora(tiny_opt(), LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "fc1"]))
    generator = torch.Generator().manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter something to fold in
            param.data = torch.randn(param.shape, generator=generator)
    export.write_hf_model(lora, lora.named_parameters(), tokenizer, tmp_path / "out", step=2, card=CARD, merge_lora=True,
                          max_shard_size="300KB")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    reference = lora.merge_and_unload()
    for name, value in reference.state_dict().items():
        # the same fp32 sum as peft's, B @ A computed once each way
        torch.testing.assert_close(merged.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "README.md").read_text() == CARD  # ours, not peft's template


def test_a_shard_size_that_is_not_one_is_refused_at_start():
    with pytest.raises(UserError, match="checkpoint.max_shard_size must be a size like"):
        config_lib.load(None, ["data.train=x.jsonl", "checkpoint.max_shard_size=2 gigs"])


def test_the_exported_tokenizer_carries_no_machine_local_keys(tokenizer, tmp_path):
    """transformers 5 records how it found a tokenizer (is_local, local_files_only) in init_kwargs and
    saves them; a model directory copied to another machine must not say where it was loaded from."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "here")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "here")  # now knows it is local
    model = tiny_opt()
    export.write_hf_model(model, model.named_parameters(), loaded, tmp_path / "out", step=1, card=CARD)
    fields = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert not set(fields) & {"is_local", "local_files_only"}, fields
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("a small text").input_ids == loaded("a small text").input_ids


def test_the_model_card_says_what_was_trained_on_what_and_how_to_load_it(tmp_path):
    cfg = config_lib.load(None, ["model.name_or_path=facebook/opt-125m", "data.train=corpus.jsonl", "lora.enabled=true",
                                 "lora.r=4", f"output_dir={tmp_path / 'my-run'}"])
    cfg.runtime = {"distributed_type": "DEEPSPEED", "num_processes": 2, "mixed_precision": "bf16",
                   "global_batch_size": 16}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.5, "eval_perplexity": 12.18},
        {"step": 4, "eval_loss": 2.25, "eval_perplexity": 9.49}, {"step": 6, "eval_loss": 2.0, "eval_perplexity": 7.39}]))
    card = model_card(cfg, 4, metrics, adapter=True)
    assert card.startswith("---\nlibrary_name: peft") and "base_model: facebook/opt-125m" in card
    assert "# my-run" in card and "for 4 optimizer steps with LoRA (r=4" in card and "`corpus.jsonl`" in card
    assert "| 2 | 2.5000 | 12.18 |" in card and "| 4 | 2.2500 | 9.49 |" in card and "| 6 |" not in card  # up to step 4
    assert 'PeftModel.from_pretrained(base, "path/to/this/directory")' in card
    assert 'AutoModelForCausalLM.from_pretrained("facebook/opt-125m")' in card
    assert "DEEPSPEED on 2 processes, mixed precision bf16; global batch 16" in card
