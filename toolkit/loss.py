"""The language-model head and its loss in one pass, without the logits tensor (training), and
held-out scoring through the same chunks (evaluation).

OPT's forward computes fp32 logits for every position (tokens x 50272: 206 MB at micro batch
8 x 128) and autograd keeps them, their log-softmax and their gradient, each written and read
again; on CPU those passes over memory cost as much as the head's matmuls. Here the head's
matmul, log-softmax and gradient are computed chunk by chunk during the forward pass (the
gradient of a sum of NLLs w.r.t. the logits is softmax - one_hot, known once the logits are),
so only the gradients of the hidden states and of the head weight are kept for backward. Only
positions that are scored are computed at all: SFT prompts and padding cost nothing.
Same loss as transformers' (sum of NLLs over the shifted labels / `num_items_in_batch`).

torch has no such fused op and transformers no hook for one (its loss functions take logits),
hence this module; Liger-Kernel's fused linear cross-entropy is the same idea for GPUs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE = -100  # labels the loss skips (transformers' and torch's ignore_index)
# fp32 logits per chunk: a bounded transient, and rows enough that the head's weight is streamed
# through few, large matmuls (benchmarks/head.py, opt-125m's head, forward + backward, 2 CPU cores:
# at two threads and 1016 tokens 2.11 s with 32 MiB chunks, 1.96 s with 128, 1.73 s with 256, which
# holds them in one chunk; at one thread and 508 tokens 1.85 s with 32 MiB, 1.66 s with 128).
CHUNK_BYTES = 256 * 2**20


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(hidden_i @ weight.T)[target_i], gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        w, h = weight.to(compute_dtype), hidden.to(compute_dtype)
        n, vocab = h.shape[0], w.shape[0]
        grad_hidden = torch.empty_like(h)
        grad_weight = None  # vocab x dim, summed over chunks in fp32 (as the head's master weight)
        loss = torch.zeros((), dtype=torch.float32, device=w.device)
        chunk = max(1, CHUNK_BYTES // (4 * vocab))
        for start in range(0, n, chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]
            logits = (h_c @ w.t()).float()
            target_logits = logits.gather(1, t_c[:, None]).squeeze(1)
            # One exp over the chunk gives both the loss (log-sum-exp) and the softmax, in place.
            shift = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(shift).exp_()
            total = exp.sum(dim=1, keepdim=True)
            loss += (shift.squeeze(1) + total.log().squeeze(1) - target_logits).sum()
            grad_logits = exp.div_(total)  # softmax - one_hot: d(sum of NLLs) / d(logits)
            grad_logits[torch.arange(len(t_c), device=t_c.device), t_c] -= 1
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk] = grad_logits @ w
            if grad_weight is None:  # the first chunk writes it: no zero-filled vocab x dim tensor first
                grad_weight = (grad_logits.t() @ h_c).float()
            elif compute_dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h_c)
            else:
                grad_weight += grad_logits.t() @ h_c
        if grad_weight is None:  # no scored position in this batch
            grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden.mul_(grad_loss).to(hidden_dtype), grad_weight.mul_(grad_loss).to(weight_dtype),
                None, None)


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast (if on) would give the head's matmul; the weight's otherwise."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the NLLs of `labels` shifted by one (position t predicts labels[t+1]), skipping IGNORE,
    for hidden states [batch, seq, dim] and a head weight [vocab, dim], in the compute dtype that
    autocast (if on) would give the head's matmul."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    scored = (targets != IGNORE).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    device, compute_dtype = hidden.device.type, head_dtype(hidden, weight)
    with torch.autocast(device, enabled=False):  # the dtypes are chosen above, explicitly
        return LinearCrossEntropy.apply(hidden, weight, targets[scored], compute_dtype)


@torch.no_grad()
def example_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example [sum of NLLs, scored tokens, correct argmax predictions] (float64) over the shifted,
    non-ignored `labels`, for hidden states [batch, seq, dim] and a head weight [vocab, dim].

    The logits exist one chunk at a time, as in training: held-out windows are as long as the model
    allows (2048 positions for every real OPT), where a whole batch's fp32 logits and their
    log-softmax would take gigabytes more than training needs."""
    batch, seq = labels.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    scored = (targets != IGNORE).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    targets = targets[scored]
    device, compute_dtype = hidden.device.type, head_dtype(hidden, weight)
    w = weight.to(compute_dtype)
    nll = torch.empty(len(scored), dtype=torch.float32, device=hidden.device)
    correct = torch.empty(len(scored), dtype=torch.bool, device=hidden.device)
    chunk = max(1, CHUNK_BYTES // (4 * w.shape[0]))
    with torch.autocast(device, enabled=False):
        for start in range(0, len(scored), chunk):
            t_c = targets[start:start + chunk]
            logits = (hidden[start:start + chunk].to(compute_dtype) @ w.t()).float()
            nll[start:start + chunk] = logits.logsumexp(dim=1) - logits.gather(1, t_c[:, None]).squeeze(1)
            correct[start:start + chunk] = logits.argmax(dim=1) == t_c
    stats = torch.zeros(batch, 3, dtype=torch.float64, device=hidden.device)
    example = torch.div(scored, seq, rounding_mode="floor")
    for column, values in enumerate((nll, torch.ones_like(nll), correct)):
        stats[:, column].index_add_(0, example, values.double())
    return stats


def fuse_head_and_loss(model, training: bool = True):
    """Make `model` (an OPTForCausalLM, or a peft model around one) compute its training loss with
    `linear_cross_entropy` (unless `training` is False: then transformers' head and loss train), and
    score held-out data with
    `example_stats`: `model(input_ids, attention_mask, labels=..., return_example_stats=True)` returns
    the [batch, 3] statistics instead of logits.

    Forwards without labels (generation) keep transformers' forward and its logits. The head runs
    through `lm_head`'s own call so that ZeRO-3 and FSDP, which gather a module's weights around its
    forward, gather the head's (tied) weight too."""
    wrapper = model
    if hasattr(model, "get_base_model"):  # peft: its forward passes our keyword arguments on to the base model's
        model = model.get_base_model()
    transformers_forward = model.forward

    def head_forward(head, hidden, labels=None, stats=False):
        if labels is None:
            return F.linear(hidden, head.weight)
        if stats:
            return example_stats(hidden, head.weight, labels)
        return linear_cross_entropy(hidden, head.weight, labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                return_example_stats=False, **kwargs):
        if return_example_stats:
            kwargs["use_cache"] = False
            hidden = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            return self.lm_head(hidden, labels=labels, stats=True)
        if labels is None or not torch.is_grad_enabled() or not training:
            return transformers_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False  # training keeps no key/value cache
        hidden = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        loss = self.lm_head(hidden, labels=labels)
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != IGNORE).sum()
        return CausalLMOutputWithPast(loss=loss / num_items_in_batch)

    model.lm_head.forward = types.MethodType(head_forward, model.lm_head)
    model.forward = types.MethodType(forward, model)
    return wrapper
