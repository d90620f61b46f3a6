"""Builders for the tokenizer and the OPT model: hub id, local HF directory, or a built-in preset.

Presets are random-init OPT models: `tiny-opt` for tests and the demo, `random-opt-*` with the
real OPT dimensions for benchmarks. They get a byte-level BPE tokenizer trained locally on the
training text, with OPT's conventions (`</s>` is BOS and EOS, `<pad>` pads).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from .config import LoraConfig, ModelConfig, UserError
from .shapes import PRESETS, layer_numel as _layer_numel

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None, cache_dir: str | Path | None = None):
    """The run's tokenizer. Presets train one on `texts` and keep it in `cache_dir`, so every rank,
    a resumed run and the exported model all use the very same tokenizer."""
    if not is_preset(cfg.name_or_path):
        try:
            return AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision)
        except (OSError, ValueError) as e:
            raise check_source(cfg.name_or_path, e) from None
    if cache_dir is not None and (Path(cache_dir) / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache_dir)
    if texts is None:
        raise UserError(f"preset {cfg.name_or_path} needs training text to build its tokenizer")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=PRESETS[cfg.name_or_path]["vocab_size"])
    if cache_dir is not None:
        save_tokenizer(tokenizer, cache_dir)
    return tokenizer


# How transformers found a tokenizer on this machine (recorded in init_kwargs since v5), not what it is:
# kept in a saved tokenizer_config.json, they travel to every machine the directory is copied to.
LOADER_KEYS = ("is_local", "local_files_only", "cache_dir", "token", "_commit_hash")


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """`tokenizer.save_pretrained(directory)` without the loader's machine-local keys."""
    import json

    tokenizer.save_pretrained(directory)
    config = Path(directory) / "tokenizer_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in fields.items() if k not in LOADER_KEYS}, indent=2,
                                 ensure_ascii=False) + "\n")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # OPT's tokenizer starts every sequence with `</s>`; keep that so presets behave like the real models.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", SPECIAL_TOKENS.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=10**9)


def check_source(name: str, error: OSError) -> UserError:
    """A clear message for a model or tokenizer that can't be loaded (transformers' own says
    "Repo id must be in the form..." for a local directory that does not exist)."""
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.exists():
            return UserError(f"model directory {name} does not exist: check model.name_or_path")
        return UserError(f"{name} is not a Hugging Face model directory ({str(error).splitlines()[0]}): it needs "
                         "config.json, the weights and the tokenizer files")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or "connect" in str(error):
        why = "the Hub is off (HF_HUB_OFFLINE)" if offline else "the Hub cannot be reached"
        return UserError(f"model {name!r} is not in the local Hugging Face cache and {why}: check the id, download "
                         "it once with network, or give a local model directory")
    return UserError(f"cannot load model {name!r} ({str(error).splitlines()[0]}): check the hub id, the network, "
                     "or give a local model directory")


def hub_config(cfg: ModelConfig):
    """config.json of a hub id or local model directory, or one clear error."""
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                          attn_implementation=attn_implementation(cfg))
    except (OSError, ValueError) as e:
        raise check_source(cfg.name_or_path, e) from None


def attn_implementation(cfg: ModelConfig) -> str:
    if cfg.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise UserError("model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU "
                            "(pip install flash-attn --no-build-isolation): install it, or use sdpa")
    return cfg.attn_implementation


def model_config(cfg: ModelConfig, tokenizer) -> OPTConfig:
    if is_preset(cfg.name_or_path):
        config = OPTConfig(**PRESETS[cfg.name_or_path], pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           attn_implementation=attn_implementation(cfg))
    else:
        config = hub_config(cfg)
        if config.model_type != "opt":
            raise UserError(f"{cfg.name_or_path} is a {config.model_type} model; this toolkit trains OPT models")
    if cfg.dropout is not None:
        config.dropout = config.attention_dropout = cfg.dropout
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} embeddings")
    return config


def shape(cfg: ModelConfig) -> dict:
    """The model's config fields (hidden_size, ffn_dim, vocab_size, ...), read from the preset or
    the model's config.json, before anything is built."""
    return dict(PRESETS[cfg.name_or_path]) if is_preset(cfg.name_or_path) else hub_config(cfg).to_dict()


def layer_numel(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (attention 4h² + feed-forward 2·h·ffn, biases aside)."""
    c = shape(cfg)
    return _layer_numel(c["hidden_size"], c["ffn_dim"])


def build_model(cfg: ModelConfig, tokenizer) -> OPTForCausalLM:
    """Always fp32 weights: mixed precision is the strategy's job (autocast, DeepSpeed or FSDP
    policy), and so is activation checkpointing (strategy.enable_activation_checkpointing).

    A preset comes back without values, never whole on any rank: on the meta device, or under
    ZeRO-3 already partitioned by `deepspeed.zero.Init` (transformers enters it in `_from_config`).
    `initialize_weights` gives it values once the strategy has placed it. A checkpoint is loaded
    as the strategy asks transformers to: partitioned under ZeRO-3, on the main process only under
    FSDP's `fsdp_cpu_ram_efficient_loading` (accelerate broadcasts it when it shards the model)."""
    config = model_config(cfg, tokenizer)
    if is_preset(cfg.name_or_path):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # transformers initialises the partitions with draws from the global generator, which
            # initialize_weights replaces; dropout must see the same generator as elsewhere.
            with torch.random.fork_rng(devices=[]):
                return OPTForCausalLM._from_config(config)
        with torch.device("meta"):
            return OPTForCausalLM(config)
    return OPTForCausalLM.from_pretrained(cfg.name_or_path, config=config, revision=cfg.revision,
                                          dtype=torch.float32, use_safetensors=None)


def preset_model(name: str, seed: int = 0, **overrides) -> OPTForCausalLM:
    """A preset with transformers' own random init, seeded, whole on the CPU: for the doctor, the
    benchmarks and the tests, which need a model of these shapes, not a run's initial weights."""
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**{**PRESETS[name], **overrides}))


def initial_model(cfg: ModelConfig, tokenizer, seed: int) -> OPTForCausalLM:
    """The model a run with this seed starts from, placed as `build_model` places it (evaluation
    of a LoRA adapter on a preset base, the skeleton a checkpoint is loaded into)."""
    model = build_model(cfg, tokenizer)
    if is_preset(cfg.name_or_path):
        initialize_weights(model, seed, torch.device("cpu"))
    return model


def initialize_weights(model: torch.nn.Module, seed: int, device: torch.device, hand_out=None) -> None:
    """Give a preset its initial weights, the same under every strategy: each parameter is drawn
    from its own generator, seeded by the run's seed and the parameter's name, so the values do
    not depend on which rank holds which part, nor on how many ranks there are. The rules are
    OPT's (transformers' `_init_weights`) and peft's LoRA defaults.

    `hand_out(param)` (default: `whole_parameter`) is a context manager that hands out the whole
    parameter to write into (None on ranks that need not) and keeps this rank's part of it
    afterwards; parameters are visited one at a time, so the largest one bounds the memory this
    takes."""
    hand_out = hand_out or whole_parameter
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives the tied lm_head and embedding a tensor each
    std = model.config.init_std
    done = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if id(param) in done:  # a tied weight, initialised as its first owner (the embedding)
                continue
            done.add(id(param))
            with torch.no_grad(), hand_out(param) as whole:
                if whole is not None:
                    _draw(whole, module, name, std, _generator(seed, _canonical(name)))


@contextmanager
def whole_parameter(param: torch.nn.Parameter):
    """The whole of `param`, to write its initial values into, whoever holds which part of it: None
    on a rank that need not write."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(param, "ds_id"):  # ZeRO-3: gathered; rank 0 writes, DeepSpeed re-partitions on exit
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            yield param.data if torch.distributed.get_rank() == 0 else None
    elif isinstance(param, DTensor):  # FSDP: every rank draws the same whole and keeps its shard
        whole = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        yield whole
        # src_data_rank=None: no broadcast, each rank slices its own (identical) copy
        shard = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        yield param.data


def _draw(whole: torch.Tensor, module: torch.nn.Module, name: str, std: float, gen: torch.Generator) -> None:
    # Drawn on the CPU, whatever the device, so that a GPU run starts from the same values.
    values = whole if whole.device.type == "cpu" else torch.empty(whole.shape, dtype=whole.dtype)
    if name.endswith("bias") or ".lora_B." in name:
        values.zero_()
    elif ".lora_A." in name:  # peft's default, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))
        bound = 1 / math.sqrt(values.shape[1])
        values.uniform_(-bound, bound, generator=gen)
    elif "LayerNorm" in type(module).__name__:
        values.fill_(1.0)
    elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        values.normal_(0.0, std, generator=gen)
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            values[module.padding_idx] = 0
    else:
        raise TypeError(f"no initialisation rule for {name} (a {type(module).__name__})")
    if values is not whole:
        whole.copy_(values)


# What wrappers insert into parameter names: peft's LoRA model and layers, checkpoint wrappers.
_WRAPPER_PARTS = ("base_model.model.", "base_layer.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _canonical(name: str) -> str:
    """The parameter's name in the plain OPTForCausalLM, under whatever wraps it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def quantized_base(cfg: ModelConfig, quant_type: str, tokenizer, seed: int, device: torch.device,
                   compute_dtype: torch.dtype) -> OPTForCausalLM:
    """QLoRA's base: every linear layer but the head in 4 bits (bitsandbytes `nf4` or `fp4`), computing
    in `compute_dtype`, on `device`. A hub or local model is quantized by transformers as it loads,
    shard by shard; a preset gets its initial weights (`initial_model`) on the CPU first."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    if not is_preset(cfg.name_or_path):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_compute_dtype=compute_dtype)
        model = OPTForCausalLM.from_pretrained(cfg.name_or_path, config=model_config(cfg, tokenizer),
                                               revision=cfg.revision, quantization_config=quantization,
                                               device_map={"": device})
    else:
        model = initial_model(cfg, tokenizer, seed)
        for parent in list(model.modules()):
            for name, linear in parent.named_children():
                if isinstance(linear, torch.nn.Linear) and linear is not model.lm_head:
                    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=compute_dtype, quant_type=quant_type)
                    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant_type)
                    layer.bias = linear.bias
                    setattr(parent, name, layer)
        model.is_loaded_in_4bit = True  # what peft reads to give these layers its 4-bit LoRA
        model = model.to(device)  # bitsandbytes quantizes as the weights move
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel the first time the
            # layer runs in eval mode (an evaluation), and from then on trains through that kernel too,
            # which adds the bias in place on a tensor autograd tracks: keep the trainable layout.
            layer.support_avx512bf16_for_cpu = False
    return model


def apply_lora(model: OPTForCausalLM, cfg: LoraConfig, frozen_dtype: torch.dtype | None = None):
    """Wrap `model` in a peft LoRA model: base weights frozen, only adapters train (in fp32). The
    frozen base goes to `frozen_dtype` (the compute dtype under autocast: it is only ever read in
    it); a 4-bit base gets peft's k-bit preparation (norms and embeddings in fp32)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, prepare_model_for_kbit_training

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise UserError(f"lora.target_modules {missing} are not modules of this model; OPT has "
                        "q_proj, k_proj, v_proj, out_proj, fc1, fc2")
    if cfg.quantize != "none":
        # the toolkit checkpoints activations itself (strategy.enable_activation_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif frozen_dtype is not None:
        model.to(frozen_dtype)  # before peft adds the adapters, which it makes fp32
    peft_config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)
