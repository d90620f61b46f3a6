"""A preset's initial weights: a function of the seed and each parameter's name alone."""

import contextlib

import pytest
import torch

from conftest import in_a_process_group_of_one
from toolkit.config import ModelConfig
from toolkit.model import build_model, initial_model, initialize_weights, train_bpe_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=2048)


def test_a_preset_is_built_without_values_and_initialised_by_seed_and_name(tokenizer):
    cfg = ModelConfig(name_or_path="tiny-opt")
    assert all(p.is_meta for p in build_model(cfg, tokenizer).parameters())  # nothing held before placement
    a, b, other = (initial_model(cfg, tokenizer, seed) for seed in (7, 7, 8))
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert torch.equal(x, y), name
        if x.std() > 0:  # drawn, not constant: another seed draws other values
            assert not torch.equal(x, z), name
    # the global generator plays no part (dropout keeps the same stream under every strategy)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    initial_model(cfg, tokenizer, 7)
    assert torch.equal(torch.get_rng_state(), state)

    # OPT's rules (transformers' _init_weights): N(0, init_std), padding row 0, LayerNorm 1/0, biases 0
    decoder = a.model.decoder
    std = a.config.init_std
    assert decoder.layers[0].fc1.weight.std().item() == pytest.approx(std, rel=0.05)
    assert decoder.embed_tokens.weight[tokenizer.pad_token_id].abs().max() == 0
    assert torch.all(decoder.layers[0].self_attn_layer_norm.weight == 1)
    assert torch.all(decoder.layers[0].fc1.bias == 0)
    assert a.lm_head.weight is decoder.embed_tokens.weight  # still tied


def test_the_values_do_not_depend_on_who_holds_which_part(tokenizer):
    """As a sharding strategy does: each parameter handed out whole in a scratch tensor, of which
    only one half (the 'shard') is kept, while other work draws from torch's global generator in
    between (dropout, another module's init). The kept halves equal the whole-model build's: the
    values come from the seed and the parameter's name, not from any shared stream."""
    cfg = ModelConfig(name_or_path="tiny-opt")
    whole = initial_model(cfg, tokenizer, 7)
    shards = {}

    @contextlib.contextmanager
    def keep_first_half(param):
        torch.rand(97)  # the global stream moves on between parameters
        scratch = torch.empty(param.shape)
        yield scratch
        shards[param] = scratch.flatten()[: param.numel() // 2].clone()

    sharded = build_model(cfg, tokenizer)
    initialize_weights(sharded, 7, torch.device("cpu"), keep_first_half)
    kept = {name: shards[p] for name, p in sharded.named_parameters()}
    for name, p in whole.named_parameters():
        torch.testing.assert_close(kept[name], p.detach().flatten()[: p.numel() // 2], rtol=0, atol=0, msg=name)


def test_fsdp_and_zero3_parameters_are_initialised_through_their_own_branches(tmp_path):
    """model.whole_parameter's FSDP2 (DTensor: each rank slices its shard of the same whole) and
    ZeRO-3 (GatheredParameters, rank 0 writes) branches, run for real in a process group of one:
    the parameters equal the CPU build's. (Two ranks holding different shards: test_strategies.)"""
    out = in_a_process_group_of_one(f"""
        import deepspeed
        from torch.distributed.fsdp import fully_shard
        from toolkit.config import ModelConfig
        from toolkit.model import build_model, initial_model, initialize_weights, train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer({TEXTS!r}, vocab_size=2048)
        cfg = ModelConfig(name_or_path="tiny-opt")
        reference = initial_model(cfg, tokenizer, 7).state_dict()
        fsdp = build_model(cfg, tokenizer)
        for layer in fsdp.model.decoder.layers:
            fully_shard(layer)
        fully_shard(fsdp)
        initialize_weights(fsdp, 7, torch.device("cpu"))
        assert all(type(p).__name__ == "DTensor" for p in fsdp.parameters())
        print("fsdp equal:", all(torch.equal(p.full_tensor(), reference[n]) for n, p in fsdp.named_parameters()))
        from transformers.integrations import HfDeepSpeedConfig

        # as accelerate does under ZeRO-3: transformers then builds the model inside zero.Init
        zero3_config = HfDeepSpeedConfig({{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}}}})
        zero3 = build_model(cfg, tokenizer)
        initialize_weights(zero3, 7, torch.device("cpu"))
        equal = []
        for name, p in zero3.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                equal.append(torch.equal(p.data, reference[name]))
        print("zero3 equal:", hasattr(p, "ds_id") and all(equal))
    """)
    assert "fsdp equal: True" in out and "zero3 equal: True" in out


def test_the_attention_implementation_is_the_one_asked_for_or_a_clear_refusal(tokenizer):
    from toolkit.config import UserError
    from toolkit.model import model_config

    for name in ("sdpa", "eager"):
        model = build_model(ModelConfig(name_or_path="tiny-opt", attn_implementation=name), tokenizer)
        assert model.config._attn_implementation == name
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package and a CUDA GPU"):
        model_config(ModelConfig(name_or_path="tiny-opt", attn_implementation="flash_attention_2"), tokenizer)
