"""The toolkit's own training run, with a probe of what each rank holds for the model's states.

    accelerate launch --config_file accelerate_configs/<strategy>.yaml benchmarks/state_memory.py \
        --result FILE -- <toolkit.train arguments>

Parameters, gradients, optimizer state and every buffer the strategy keeps for them (DDP's
buckets, DeepSpeed's flat partitions) are all resident memory, and not all of them are tensors
Python can see (DDP's buckets live in C++). So the probe measures the process: its resident
memory once gradients exist (just before each optimizer step's clipping), minus its resident
memory just before the model was built, after imports, data and tokenizer. What this counts
beyond the model states is the current micro-batch's leftovers, the same for every strategy.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from toolkit import model as model_lib, train  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
seen = {"before_model": 0, "states": 0}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main():
    result = sys.argv[sys.argv.index("--result") + 1]
    toolkit_args = sys.argv[sys.argv.index("--") + 1:]
    build_model, clip = model_lib.build_model, Accelerator.clip_grad_norm_

    def probed_build(*args, **kwargs):
        seen["before_model"] = resident_bytes()
        return build_model(*args, **kwargs)

    def probed_clip(self, *args, **kwargs):
        seen["states"] = max(seen["states"], resident_bytes() - seen["before_model"])
        return clip(self, *args, **kwargs)

    model_lib.build_model = probed_build
    Accelerator.clip_grad_norm_ = probed_clip
    train.main(toolkit_args)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{result}.rank{rank}").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
