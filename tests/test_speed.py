"""What the training step does to be fast, each held to computing the same thing: the fused LM
head + loss, packed SFT rows, and the CPU thread share. (Its speed is measured in benchmarks/.)"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import fake_accelerator, jemalloc_library, tiny_opt
from toolkit import cpu, loss as loss_lib
from toolkit.data import IGNORE, Collator, _pack_examples
from toolkit.measure import count_tokens


def batch_with_ignored_labels() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 2048, (4, 48), generator=generator)
    labels = ids.clone()
    labels[:, :11] = IGNORE  # a masked prompt
    labels[1, 30:] = IGNORE  # and padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunk_bytes", [loss_lib.CHUNK_BYTES, 3 * 2048 * 4])  # one chunk; 3 tokens a chunk
def test_fused_loss_equals_transformers_loss_and_gradients(chunk_bytes, monkeypatch):
    monkeypatch.setattr(loss_lib, "CHUNK_BYTES", chunk_bytes)
    plain = tiny_opt()
    fused = loss_lib.fuse_head_and_loss(copy.deepcopy(plain))
    assert fused.lm_head.weight is fused.model.decoder.embed_tokens.weight  # still tied
    batch = batch_with_ignored_labels()
    losses = []
    for model in (plain, fused):
        loss = model(**batch, num_items_in_batch=torch.tensor(100)).loss
        loss.backward()
        losses.append(loss.item())
    # fp32: the same sums in another order (chunked matmuls, logsumexp vs log_softmax): ~1e-7.
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().clamp(min=1e-3)  # k_proj's bias has a zero gradient in exact arithmetic
        assert (p.grad - q.grad).abs().max() <= 1e-5 * scale, name


def test_fused_loss_under_bf16_autocast_computes_the_head_in_bf16():
    plain = tiny_opt()
    fused = loss_lib.fuse_head_and_loss(copy.deepcopy(plain))
    batch = batch_with_ignored_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, ours = plain(**batch).loss, fused(**batch).loss
    ours.backward()
    # Both compute the head's matmul in bf16 (8 bits of mantissa) and the softmax in fp32: they
    # agree to bf16 rounding of the logits, not to fp32; an fp32 head would differ by as much.
    assert ours.item() == pytest.approx(reference.item(), rel=2e-3)
    assert fused.lm_head.weight.grad.dtype == torch.float32


def test_forwards_without_gradients_and_generation_keep_the_logits():
    fused = loss_lib.fuse_head_and_loss(tiny_opt())
    batch = batch_with_ignored_labels()
    with torch.no_grad():
        out = fused(**batch)
    assert out.logits.shape == (4, 48, 2048)
    assert fused.generate(batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flash_attention_2"])
def test_packed_sft_rows_score_each_example_as_if_it_were_alone(attn_implementation):
    examples = [([2, 5, 6, 7, 8], [IGNORE, IGNORE, 6, 7, 8]), ([2, 9, 10, 11], [IGNORE, IGNORE, 10, 11]),
                ([2, 12, 13, 14, 15, 16], [IGNORE, 12, 13, 14, 15, 16])]
    rows = _pack_examples({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}, block_size=12)
    # whole examples, at most 12 tokens a row, best-fit decreasing: 6 opens a row, 5 fills it to 11, 4 opens one
    assert rows["lengths"] == [[6, 5], [4]]
    packed = Collator(pad_token_id=1, attn_implementation=attn_implementation)(
        [{k: rows[k][i] for k in rows} for i in range(2)])
    if attn_implementation == "flash_attention_2":  # not installable here (no CUDA): what it is given
        assert "attention_mask" not in packed and packed["position_ids"].tolist() == [[*range(6), *range(5)],
                                                                                      [*range(4), *[0] * 7]]
        return
    in_packed_order = [examples[2], examples[0], examples[1]]
    alone = Collator(pad_token_id=1)([{"input_ids": ids, "labels": labels} for ids, labels in in_packed_order])
    model = tiny_opt(attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation

    def token_nlls(batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_targets")}
        logits = model(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return nll[targets != IGNORE]

    with torch.no_grad():
        torch.testing.assert_close(token_nlls(packed), token_nlls(alone), rtol=1e-5, atol=1e-5)
    # Telemetry counts the real tokens of packed rows (the padding is not throughput).
    assert int(count_tokens(packed)[0]) == int(count_tokens(alone)[0]) == 15


@pytest.mark.parametrize("env, asked, expected", [
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}, 0, (4, "cores / local processes")),  # accelerate's default
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 0, (2, "cores / local processes")),
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 0, (3, "OMP_NUM_THREADS")),  # set on purpose
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 1, (1, "train.cpu_threads")),
])
def test_each_process_computes_with_its_share_of_the_cores(env, asked, expected, monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(4)))  # a 4-core machine
    monkeypatch.setattr(cpu.torch.cuda, "is_available", lambda: False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = torch.get_num_threads()
    try:
        runtime = cpu.use_cpu_share(asked)
        assert (runtime["cpu_threads"], runtime["cpu_threads_from"]) == expected
        assert torch.get_num_threads() == expected[0]
    finally:
        torch.set_num_threads(before)


REUSE_PROBE = """
import os, sys, torch
from toolkit import cpu
sharded = sys.argv[1] == "sharded"
print({**cpu.tune_cpu_allocator(sharded), **cpu.allocator_for_the_loop(sharded)}["cpu_allocator"])  # as train.py
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = torch.empty(7_000_000).fill_(1.0)  # 28 MB: a gathered layer of random-opt-125m
before = resident()
del block
print(before - resident())  # what freeing it gave back to the OS
"""


@pytest.mark.parametrize("allocator, strategy, kept", [
    ("glibc", "whole", True), ("glibc", "sharded", False), ("jemalloc", "whole", True), ("jemalloc", "sharded", True)])
def test_the_allocator_keeps_or_returns_big_freed_blocks_as_the_strategy_needs(allocator, strategy, kept):
    """Kept: the freed block stays resident for the next step to reuse; returned: the OS has its 28 MB back."""
    env = dict(os.environ, LD_PRELOAD=jemalloc_library()) if allocator == "jemalloc" else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE, strategy], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    setting, returned = out[0], int(out[1])
    assert setting.startswith("jemalloc") == (allocator == "jemalloc")
    assert (returned < 2e6) if kept else (returned > 26e6), (setting, returned)


class LargestTensor(TorchDispatchMode):
    """The most elements any tensor an operation produced had, while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_evaluation_scores_through_the_chunked_head_without_full_logits(monkeypatch):
    """Held-out windows are 2048 positions for a real OPT: evaluation must not hold [batch,
    sequence, vocab] logits (nor their log-softmax), training's chunks serve it too. Same numbers as
    transformers' full logits, to fp32 summation order (1e-6)."""
    from toolkit.validation import evaluate_model

    monkeypatch.setattr(loss_lib, "CHUNK_BYTES", 16 * 2048 * 4)  # 16 positions a chunk
    plain = tiny_opt()
    fused = loss_lib.fuse_head_and_loss(copy.deepcopy(plain), training=False)
    batch = {**batch_with_ignored_labels(), "n_bytes": torch.tensor([7, 0, 5, 0]),
             "documents": torch.tensor([1, 0, 1, 0])}
    with LargestTensor() as seen:
        ours = evaluate_model(fused, [batch], fake_accelerator())
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")[scored]
    assert ours["tokens"] == int(scored.sum())
    assert ours["loss"] == pytest.approx(nll.double().mean().item(), rel=1e-6)
    assert ours["accuracy"] == pytest.approx((logits.argmax(-1) == targets)[scored].double().mean().item(), abs=1e-12)
    assert seen.largest < batch["input_ids"].numel() * 2048  # full logits: [4, 48, 2048]; the largest here is a weight
