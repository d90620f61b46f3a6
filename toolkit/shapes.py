"""OPT's shapes, in one place: the published facebook/opt-* configs, and the built-in presets made
from them (model.py builds these, plan.py sizes them, the benchmarks train them). Standard library
only, so the planner starts without torch."""

from __future__ import annotations

# The published facebook/opt-* configs; vocab 50272 and 2048 positions throughout.
REAL = dict(vocab_size=50272, max_position_embeddings=2048)
OPT_SIZES: dict[str, dict] = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                 word_embed_proj_dim=768),
    # 350m alone is post-LN (no final layer norm) and projects its 512-wide embeddings in and out
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, word_embed_proj_dim=512,
                 do_layer_norm_before=False),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                 word_embed_proj_dim=2048),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                 word_embed_proj_dim=2560),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                 word_embed_proj_dim=4096),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480,
                word_embed_proj_dim=5120),
    "30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672,
                word_embed_proj_dim=7168),
    "66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864,
                word_embed_proj_dim=9216),
}

# Random-init models that the toolkit builds by name (model.build_model), no download needed.
PRESETS: dict[str, dict] = {
    # 0.76M parameters: small enough for CPU tests, large enough (> 1 MiB of fp32 optimizer state
    # per rank on 2 ranks) that DeepSpeed's NVMe offload really swaps, which it skips below that.
    "tiny-opt": dict(vocab_size=2048, max_position_embeddings=512, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128, dropout=0.0,
                     attention_dropout=0.0),
    # 77M parameters in 24 layers of 3M: the whole model (308 MB in fp32) dwarfs its largest
    # parameter, so tests can tell a sharded build (half of it per rank) from a whole one.
    "small-opt": dict(vocab_size=2048, max_position_embeddings=512, hidden_size=512, num_hidden_layers=24,
                      num_attention_heads=8, ffn_dim=2048, word_embed_proj_dim=512, dropout=0.0,
                      attention_dropout=0.0),
    # the real shapes, random weights: for benchmarks
    **{f"random-opt-{size}": {**REAL, **OPT_SIZES[size]} for size in ("125m", "350m", "1.3b", "2.7b", "6.7b")},
}


def opt_config(size: str) -> dict:
    """facebook/opt-<size>'s config.json fields that shape it."""
    return {"model_type": "opt", **REAL, "do_layer_norm_before": True, **OPT_SIZES[size]}


def layer_numel(hidden_size: int, ffn_dim: int) -> int:
    """Parameters of one decoder layer: attention 4h² + feed-forward 2·h·ffn, biases aside."""
    return 4 * hidden_size * hidden_size + 2 * hidden_size * ffn_dim


def largest_parameter_numel(c: dict) -> int:
    """Elements of an OPT model's largest single parameter: the token embeddings, the learned
    positions (OPT offsets them by 2) or a feed-forward matrix."""
    return max(c["vocab_size"] * c.get("word_embed_proj_dim", c["hidden_size"]),
               (c["max_position_embeddings"] + 2) * c["hidden_size"], c["ffn_dim"] * c["hidden_size"])
