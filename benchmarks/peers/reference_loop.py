"""The reference: a plain Accelerate training loop in the style of transformers'
examples/pytorch/language-modeling/run_clm_no_trainer.py (AdamW, linear schedule, no clipping),
on the benchmark's job. Launch with `accelerate launch`; on a machine without a GPU
`Accelerator(cpu=True)` runs DDP over gloo when several processes are launched."""

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import OPTForCausalLM, default_data_collator, get_scheduler

from common import StepClock, clm_dataset, model_config, parse_args


def main():
    args = parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    model = OPTForCausalLM(model_config(args))
    with accelerator.main_process_first():
        train_dataset = clm_dataset(args)
    train_dataloader = DataLoader(train_dataset.with_format("torch", columns=["input_ids", "attention_mask", "labels"]),
                                  shuffle=True, collate_fn=default_data_collator, batch_size=args.micro_batch_size,
                                  drop_last=True)
    no_decay = ["bias", "layer_norm.weight"]
    grouped = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.0},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(grouped, lr=args.lr)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.max_steps)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)

    clock, completed_steps = StepClock(), 0
    model.train()
    while completed_steps < args.max_steps:
        for batch in train_dataloader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            completed_steps += 1
            clock.tick(loss.detach())
            if completed_steps >= args.max_steps:
                break
    if accelerator.is_main_process:
        clock.write(args, accelerator.num_processes)
    accelerator.end_training()


if __name__ == "__main__":
    main()
