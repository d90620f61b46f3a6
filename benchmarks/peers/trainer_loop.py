"""transformers.Trainer on the benchmark's job, with its defaults (fused AdamW, clipping at 1.0),
a linear schedule and no checkpoints or logging. Launch with `accelerate launch`: on a machine
without a GPU `use_cpu` with the gloo backend runs DDP when several processes are launched."""

import os

import torch
from transformers import OPTForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from common import StepClock, clm_dataset, model_config, parse_args


class StepEnds(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()


def main():
    args = parse_args()
    on_cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir="/tmp/trainer-benchmark", per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        seed=args.seed, save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_drop_last=True, use_cpu=on_cpu, ddp_backend="gloo" if on_cpu and several else None)
    torch.manual_seed(args.seed)  # Trainer seeds in its __init__; the model is built before, as users do
    model = OPTForCausalLM(model_config(args))
    clock = StepClock()
    trainer = Trainer(model=model, args=training_args, train_dataset=clm_dataset(args),
                      data_collator=default_data_collator, callbacks=[StepEnds(clock)])
    result = trainer.train()
    if trainer.is_world_process_zero():
        clock.losses = [result.training_loss]
        clock.write(args, training_args.world_size)


if __name__ == "__main__":
    main()
