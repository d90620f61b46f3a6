"""`toolkit.train` with what a GPU or a large data set would do to it, forced at chosen points:

    accelerate launch ... -m tests.instrumented_train [options] -- <toolkit.train arguments>

--overflow-steps 3,4,5   the gradients of these optimizer steps are infinite (an fp16 overflow, or
                         in fp32 a diverging step), while the loss stays finite
--slow-preprocessing S   the main process spends S more seconds tokenizing the training data (a
                         large corpus seen for the first time)
--eval-losses 3,2,4      the held-out losses the evaluations report, in turn (the real metrics for
                         the rest): a run whose best evaluation is where the test wants it
--count-conversions F    write to F, per optimizer step, how many times a tensor's value was read
                         back into Python (.item(), float(), bool(), .tolist(), ...): on a GPU each
                         waits for the device to catch up. Not counted: what the data loader does
                         while it makes the next batch, on the host (its sampler's CPU tensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from toolkit import data, model as model_lib, telemetry, train

READ_BACKS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


def overflow_at(steps: set[int]) -> None:
    """Make the gradient reaching the final layer norm's output infinite in the training forwards
    of `steps` (one forward per optimizer step: run with grad_accum_steps=1); every weight before it
    then gets an infinite or NaN gradient, as from an overflow in fp16."""
    build = model_lib.build_model

    def build_overflowing(*args, **kwargs):
        model = build(*args, **kwargs)
        forwards = 0

        def inject(module, inputs, output):
            nonlocal forwards
            if not torch.is_grad_enabled():  # evaluation
                return
            forwards += 1
            if forwards in steps:
                output.register_hook(lambda grad: torch.full_like(grad, float("inf")))

        model.model.decoder.final_layer_norm.register_forward_hook(inject)
        return model

    model_lib.build_model = build_overflowing


def scripted_eval_losses(losses: list[float]) -> None:
    from toolkit import validation

    evaluate_model, given = validation.evaluate_model, iter(losses)

    def scripted(*args, **kwargs):
        metrics = evaluate_model(*args, **kwargs)  # all ranks still run the real one (its collectives)
        loss = next(given, metrics["loss"])
        return {**metrics, "loss": loss, "perplexity": math.exp(loss)}

    validation.evaluate_model = scripted


def slow_preprocessing(seconds: float) -> None:
    tokenize = data.tokenize_for_training

    def slowly(*args, **kwargs):
        if int(os.environ.get("RANK", "0")) == 0:
            time.sleep(seconds)
        return tokenize(*args, **kwargs)

    data.tokenize_for_training = slowly


class CountReadBacks(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.step = 0  # the optimizer step running: 1, 2, ... (0: before the loop)
        self.loading = False
        self.counts = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READ_BACKS and not self.loading:
            self.counts[self.step] += 1
        return func(*args, **(kwargs or {}))


def count_conversions() -> CountReadBacks:
    mode = CountReadBacks()
    begins, micro_batches = telemetry.Telemetry.step_begins, train.micro_batches

    def step_begins(self):
        mode.step += 1
        begins(self)

    def loading_uncounted(*args):
        batches = micro_batches(*args)
        while True:
            mode.loading = True
            try:
                batch = next(batches)
            finally:
                mode.loading = False
            yield batch

    telemetry.Telemetry.step_begins = step_begins
    train.micro_batches = loading_uncounted
    return mode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overflow-steps", default="")
    parser.add_argument("--slow-preprocessing", type=float, default=0.0)
    parser.add_argument("--eval-losses", default="")
    parser.add_argument("--count-conversions", default="")
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.overflow_steps:
        overflow_at({int(s) for s in args.overflow_steps.split(",")})
    if args.slow_preprocessing:
        slow_preprocessing(args.slow_preprocessing)
    if args.eval_losses:
        scripted_eval_losses([float(x) for x in args.eval_losses.split(",")])
    if not args.count_conversions:
        train.run_cli(lambda: train.main(rest))
        return
    mode = count_conversions()
    try:
        with mode:
            train.run_cli(lambda: train.main(rest))
    finally:
        with open(args.count_conversions, "w") as f:
            json.dump({str(step): n for step, n in sorted(mode.counts.items())}, f)


if __name__ == "__main__":
    main()
