"""A preset's initial weights: a function of the seed and each parameter's name alone."""

import contextlib

import pytest
import torch

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
    only one half (the 'shard') is kept. The kept halves equal the whole-model build's."""
    cfg = ModelConfig(name_or_path="tiny-opt")
    whole = initial_model(cfg, tokenizer, 7)
    shards = {}

    @contextlib.contextmanager
    def keep_first_half(param):
        scratch = torch.empty(param.shape)
        yield scratch
        shards[param] = scratch.flatten()[: param.numel() // 2].clone()

    sharded = build_model(cfg, tokenizer)
    initialize_weights(sharded, 7, torch.device("cpu"), keep_first_half)
    kept = {name: shards[p] for name, p in sharded.named_parameters()}
    for name, p in whole.named_parameters():
        torch.testing.assert_close(kept[name], p.detach().flatten()[: p.numel() // 2], rtol=0, atol=0, msg=name)
