"""The toolkit against its peers, on this machine, in one run.

    python benchmarks/run.py --quick --json results.json     # 14 minutes on 2 CPU cores
    python benchmarks/run.py --json results.json --results benchmarks/RESULTS.md   # the full run, 35 to 75 minutes

Peers run the identical job (random-opt-125m shapes, the same text and tokenizer, block 128,
global batch, fp32, seed, process count and threads per process, all under `accelerate launch`):
- reference: benchmarks/peers/reference_loop.py, a plain Accelerate loop as in transformers'
  run_clm_no_trainer.py;
- trainer: benchmarks/peers/trainer_loop.py, transformers.Trainer with its defaults.
The toolkit and a peer run at the same time, taking turns optimizer step by optimizer step
(benchmarks/lockstep.py passes a baton between them; only one computes at a time, with the whole
machine). Each step's tokens over its seconds is a rate; a ratio is the median over the pairs of
adjacent steps after the warm-up (the toolkit's step k against the peer's step k), so changes
of the machine's speed, which on a shared VM come and go within a minute, hit both alike.

JSON keys (toolkit / peer unless said): throughput_vs_reference and throughput_vs_trainer (the
worse of 1 and 2 processes; both are under "detail"), mfu_vs_matmul_peak (model FLOPs/s of the
1-process toolkit run over the best fp32 matmul rate measured in this run with the same threads),
packing_useful_tokens_speedup (non-pad tokens/s of packed over padded SFT batches),
zero3_state_memory_vs_ddp (resident bytes of parameters + gradients + optimizer state per rank,
benchmarks/state_memory.py, 2 ranks), adam8bit_state_vs_adamw (bytes of optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the toolkit, and memory.py beside this file
PRESET = "random-opt-125m"
MODES = {  # the same job (global batch 8 x 128 tokens; micro batch = 8 / processes), more turns in full
    "quick": dict(global_batch=8, steps=7, warmup=2, rounds=1, configs=False),
    "full": dict(global_batch=8, steps=10, warmup=2, rounds=2, configs=True),
}


def cores() -> int:
    return len(os.sched_getaffinity(0))


class Bench:
    def __init__(self, mode: str, work: Path, preload: str | None = None):
        self.mode, self.work, self.preload = MODES[mode], work, preload
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs = 0

    # --- the job -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Text, its tokenizer (trained once, used by every program), SFT data, model shapes."""
        from toolkit.demo_data import sft_tasks, stdlib_docs
        from toolkit.model import PRESETS, train_bpe_tokenizer

        docs = [d for _, d in zip(range(3000), stdlib_docs())]
        self.text = self.work / "text.jsonl"
        self.text.write_text("".join(json.dumps(d) + "\n" for d in docs))
        self.sft = self.work / "sft.jsonl"
        self.sft.write_text("".join(json.dumps(d) + "\n" for d in sft_tasks(n=3000, seed=0)))
        self.tokenizer = self.work / "tokenizer"
        tokenizer = train_bpe_tokenizer((d["text"] for d in docs), vocab_size=PRESETS[PRESET]["vocab_size"])
        tokenizer.save_pretrained(self.tokenizer)
        self.model_config = self.work / "model_config.json"
        self.model_config.write_text(json.dumps(dict(
            PRESETS[PRESET], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)))

    def start(self, config: str, program: list[str], processes: int, name: str) -> tuple[subprocess.Popen, Path]:
        """`accelerate launch` with the same threads per process for every program, in its own session
        (so that a failed partner's whole process tree can be stopped) and on its own port."""
        self.runs += 1
        log = self.logs / f"{self.runs:03d}-{name}.log"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", str(processes),
               "--mixed_precision", "no", "--num_cpu_threads_per_process", str(max(1, cores() // processes)),
               "--main_process_port", str(free_port()), *program]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONPATH=str(ROOT))
        if self.preload and config != "ddp":  # the strategy's launch only: DDP as shipped, with glibc
            env["LD_PRELOAD"] = self.preload
        with log.open("w") as out:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True), log

    def run_together(self, launches: list[tuple[str, list[str], int, str]]) -> None:
        """Start every launch, wait for all; if one fails, stop the others (they would wait for it)."""
        started = [self.start(*launch) for launch in launches]
        try:
            while any(proc.poll() is None for proc, _ in started):
                for proc, log in started:
                    if proc.poll():
                        raise SystemExit(f"{log.stem} failed ({proc.returncode}): see {log}")
                time.sleep(0.5)
            for proc, log in started:
                if proc.returncode:
                    raise SystemExit(f"{log.stem} failed ({proc.returncode}): see {log}")
        finally:
            for proc, _ in started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)

    def launch(self, config: str, program: list[str], processes: int, name: str) -> None:
        self.run_together([(config, program, processes, name)])

    def alternated(self, processes: int, programs: dict[str, tuple[str, list[str]]]) -> dict[str, list[float]]:
        """Run the programs ({name: (accelerate config, program)}) at once, taking turns step by step
        (lockstep.py): for each, the seconds of its steps after the warm-up ones (the slowest rank's)."""
        ring = Path(tempfile.mkdtemp(prefix="ring-", dir=self.work))
        lockstep = [str(ROOT / "benchmarks" / "lockstep.py"), "--ring", str(ring), "--of", str(len(programs)),
                    "--steps", str(self.mode["steps"])]
        self.run_together([(config, [*lockstep, "--turn", str(k), "--", *program], processes, name)
                           for k, (name, (config, program)) in enumerate(programs.items())])
        seconds = {}
        for k, name in enumerate(programs):
            ranks = [json.loads((ring / f"seconds-{k}-rank{r}.json").read_text()) for r in range(processes)]
            seconds[name] = [max(step) for step in zip(*ranks)][self.mode["warmup"] - 1:]  # lockstep times from step 2
        return seconds

    def toolkit_args(self, out: Path, processes: int, **overrides) -> list[str]:
        m = self.mode
        args = {"model.name_or_path": PRESET, "data.train": self.text, "data.block_size": 128,
                "data.eval_fraction": 0.01, "train.micro_batch_size": m["global_batch"] // processes,
                "train.grad_accum_steps": 1, "train.max_steps": m["steps"], "train.seed": 42, "optim.lr": 3e-4,
                "optim.scheduler": "linear", "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0,
                "eval.max_batches": 1, "checkpoint.every": 0, "train.report_to": "none", "train.log_every": 1,
                "output_dir": out}
        args.update(overrides)
        shutil.rmtree(out, ignore_errors=True)
        (out / "tokenizer").parent.mkdir(parents=True)
        shutil.copytree(self.tokenizer, out / "tokenizer")  # the same tokenizer as the peers'
        return [f"{k}={v}" for k, v in args.items()]

    def toolkit_program(self, out: Path, processes: int, **overrides) -> list[str]:
        return ["-m", "toolkit.train", *self.toolkit_args(out, processes, **overrides)]

    @staticmethod
    def toolkit_steps(out: Path) -> list[dict]:
        """The records of the run's optimizer steps, from its metrics.jsonl."""
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r]

    def toolkit_tokens(self, out: Path) -> list[int]:
        """Input tokens (non-pad, all ranks) of each optimizer step."""
        return [r["input_tokens"] for r in self.toolkit_steps(out)]

    def peer_program(self, name: str, processes: int) -> list[str]:
        m = self.mode
        return [str(ROOT / "benchmarks" / "peers" / f"{name}_loop.py"), "--model_config", str(self.model_config),
                "--tokenizer", str(self.tokenizer), "--data", str(self.text), "--block_size", "128",
                "--micro_batch_size", str(m["global_batch"] // processes), "--max_steps", str(m["steps"]),
                "--lr", "3e-4", "--seed", "42", "--result", str(self.work / f"{name}.json")]

    def peer_tokens(self, name: str, processes: int) -> int:
        """Tokens of each of the peer's optimizer steps (all ranks), from the result it wrote."""
        r = json.loads((self.work / f"{name}.json").read_text())
        if r["world_size"] != processes:
            raise SystemExit(f"{name} ran on {r['world_size']} processes, not {processes}")
        return r["tokens_per_step"]

    # --- the measurements ----------------------------------------------------------------------
    def toolkit_against(self, peer: str, processes: int) -> tuple[list[float], list[float]]:
        """The toolkit and a peer taking turns step by step: each one's tokens/s of its steps after
        the warm-up, in order (the toolkit's step k against the peer's step k)."""
        config, toolkit_out = "single" if processes == 1 else "ddp", self.work / "toolkit"
        seconds = self.alternated(processes, {"toolkit": (config, self.toolkit_program(toolkit_out, processes)),
                                              peer: (config, self.peer_program(peer, processes))})
        ours = [t / s for t, s in zip(self.toolkit_tokens(toolkit_out)[self.mode["warmup"]:], seconds["toolkit"])]
        return ours, [self.peer_tokens(peer, processes) / s for s in seconds[peer]]

    def throughput(self) -> dict:
        """The toolkit against each peer, the two taking turns step by step; each ratio is the median
        over the pairs of adjacent steps (the toolkit's step k against the peer's step k)."""
        out = {}
        for processes in (1, 2):
            rates, ratios = {"toolkit": []}, {}
            for _ in range(self.mode["rounds"]):
                for peer in ("reference", "trainer"):
                    ours, theirs = self.toolkit_against(peer, processes)
                    rates["toolkit"] += ours
                    rates.setdefault(peer, []).extend(theirs)
                    ratios.setdefault(peer, []).extend(a / b for a, b in zip(ours, theirs))
            runtime = yaml.safe_load((self.work / "toolkit" / "config.yaml").read_text())["runtime"]
            out[processes] = {
                "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
                "vs_reference": statistics.median(ratios["reference"]),
                "vs_trainer": statistics.median(ratios["trainer"]),
                "step_pairs": len(ratios["trainer"]), "runtime": runtime}
        return out

    def mfu(self, one_process: dict) -> dict:
        import torch

        from toolkit.measure import matmul_tflops

        torch.set_num_threads(cores())
        peak = matmul_tflops(torch.device("cpu"), n=2048, seconds=5.0) * 1e12
        rt = one_process["runtime"]
        flops_per_token = rt["flops_per_token"] + rt["attention_flops_per_token_per_position"] * 128
        achieved = one_process["tokens_per_s"]["toolkit"] * flops_per_token
        return {"achieved_tflops": achieved / 1e12, "matmul_peak_tflops": peak / 1e12, "ratio": achieved / peak}

    def packing(self) -> dict:
        """Non-pad tokens/s of packed against padded SFT batches, the two runs taking turns step by
        step; their batches differ, so each run's rate is its tokens over its seconds."""
        outs = {packed: self.work / f"toolkit-packing-{packed}" for packed in ("false", "true")}
        turns = []
        for _ in range(self.mode["rounds"]):
            seconds = self.alternated(1, {packed: ("single", self.toolkit_program(
                out, 1, **{"data.train": self.sft, "data.packing": packed})) for packed, out in outs.items()})
            turns.append({packed: sum(self.toolkit_tokens(out)[self.mode["warmup"]:]) / sum(seconds[packed])
                          for packed, out in outs.items()})
        return {"tokens_per_s": {k: statistics.median(t[k] for t in turns) for k in outs},
                "ratio": statistics.median(t["true"] / t["false"] for t in turns)}

    def state_memory(self) -> dict:
        held = {}
        for config in ("ddp", "zero3"):
            out = self.work / "state-memory"
            result = self.work / f"state-{config}"
            args = self.toolkit_args(out, 2, **{"train.max_steps": 3, "train.micro_batch_size": 1})
            self.launch(config, [str(ROOT / "benchmarks" / "state_memory.py"), "--result", str(result), "--", *args],
                        2, f"state-memory-{config}")
            held[config] = max(json.loads(Path(f"{result}.rank{r}").read_text())["states"] for r in (0, 1))
        return {"bytes_per_rank": held, "ratio": held["zero3"] / held["ddp"]}

    def adam8bit(self) -> dict:
        """Optimizer state bytes after one step, AdamW vs 8-bit AdamW, on the real shapes."""
        import torch
        from memory import build

        from toolkit.config import OptimConfig
        from toolkit.optim import build_optimizer
        from toolkit.measure import optimizer_state_size

        state = {}
        ids = torch.randint(4, 50000, (1, 32))
        for name in ("adamw", "adamw_8bit"):
            model = build(PRESET)
            optimizer = build_optimizer(model, OptimConfig(name=name))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            state[name] = optimizer_state_size(optimizer)[1]
            del model, optimizer
        return {"bytes": state, "ratio": state["adamw_8bit"] / state["adamw"]}

    def checkpoint(self) -> dict:
        """accelerate's save_state / load_state (what toolkit.checkpoint wraps) of random-opt-125m with
        its AdamW state, in this process: seconds per GB written and read."""
        import torch
        from accelerate import Accelerator

        from memory import build

        from toolkit.config import OptimConfig
        from toolkit.optim import build_optimizer

        accelerator = Accelerator(cpu=True)
        model = build(PRESET)
        optimizer = build_optimizer(model, OptimConfig())
        model, optimizer = accelerator.prepare(model, optimizer)
        ids = torch.randint(4, 50000, (1, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        path = self.work / "checkpoint"
        start = time.perf_counter()
        accelerator.save_state(path)
        saved = time.perf_counter() - start
        gb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
        start = time.perf_counter()
        accelerator.load_state(path)
        loaded = time.perf_counter() - start
        shutil.rmtree(path)
        return {"GB": gb, "save_s_per_GB": saved / gb, "load_s_per_GB": loaded / gb}

    def preprocessing(self) -> dict:
        """toolkit.data on the benchmark's text: tokens/s the first time, and the second run (the
        datasets cache of every map)."""
        from transformers import AutoTokenizer

        from toolkit import data
        from toolkit.config import DataConfig

        source = self.work / f"preprocess-{time.time_ns()}.jsonl"  # a new file: nothing cached yet
        shutil.copy(self.text, source)
        cfg = DataConfig(train=str(source), block_size=128)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            raw, _ = data.load_raw(cfg, 42)
            blocks = data.tokenize_for_training(raw, tokenizer, cfg)
            seconds.append(time.perf_counter() - start)
        tokens = len(blocks) * 128
        return {"tokens": tokens, "first_tokens_per_s": tokens / seconds[0], "second_run_s": seconds[1],
                "first_run_s": seconds[0]}

    def activation_checkpointing(self) -> dict:
        """Bytes autograd saves for backward in one forward, micro batch 8 x 128, with and without."""
        import torch

        from memory import build, saved_activation_bytes

        ids = torch.randint(4, 50000, (8, 128))
        saved = {}
        for on in (False, True):
            model = build(PRESET)
            if on:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            saved[on] = saved_activation_bytes(model, ids)
        return {"plain_MiB": saved[False] / 2**20, "checkpointed_MiB": saved[True] / 2**20,
                "ratio": saved[True] / saved[False]}

    def strategies(self, configs: list[str]) -> dict:
        """tokens/s of each accelerate config against DDP on as many processes, the two taking turns step
        by step (the ratio: the median over pairs of adjacent steps), and what each rank sends per step."""
        out, warm = {}, self.mode["warmup"]
        for config in configs:
            processes = config_processes(config)
            runs = {"ddp": self.work / "ddp", config: self.work / "strategy"}
            seconds = self.alternated(processes, {name: (name, self.toolkit_program(out_dir, processes))
                                                  for name, out_dir in runs.items()})
            rates = {name: [t / s for t, s in zip(self.toolkit_tokens(out_dir)[warm:], seconds[name])]
                     for name, out_dir in runs.items()}
            sent = [r.get("comm_bytes", 0) for r in self.toolkit_steps(runs[config])[warm:]]
            out[config] = {"processes": processes, "tokens_per_s": statistics.median(rates[config]),
                           "ddp_tokens_per_s": statistics.median(rates["ddp"]),
                           "vs_ddp": statistics.median(a / b for a, b in zip(rates[config], rates["ddp"])),
                           "step_pairs": len(rates[config]), "mb_per_rank_step": statistics.median(sent) / 1e6}
        return out


def config_processes(config: str) -> int:
    """The processes an accelerate config is written for: 2, and 4 for hsdp, whose 2 replicas x 2 shards
    mesh torch refuses on fewer."""
    return yaml.safe_load((ROOT / "accelerate_configs" / f"{config}.yaml").read_text())["num_processes"]


def free_port() -> int:
    """A TCP port free now, for a launch's rendezvous: programs launched together must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def whole_run_args(argv, description: str, quick: str, section: str, prefix: str, extra=None):
    """The arguments of a benchmark that runs whole jobs (this one, scaling.py): (args, mode, work)."""
    parser = argparse.ArgumentParser(description=description)
    if extra:
        extra(parser)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--results", type=Path, help=f"markdown file whose {section} section is rewritten (RESULTS.md)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return args, "quick" if args.quick else "full", work


def main(argv=None) -> None:
    def only_strategies(parser):
        parser.add_argument("--strategies", nargs="+", metavar="CONFIG",
                            help="only the strategy table, for these accelerate configs (each in turns with DDP); "
                                 "with --json, their rows replace those of the results already in that file")
        parser.add_argument("--preload", metavar="LIB",
                            help="with --strategies: LD_PRELOAD this allocator (libjemalloc.so.2) in the "
                                 "strategies' launches, not in DDP's")
    args, mode, work = whole_run_args(argv, __doc__.splitlines()[0], "fewer, shorter turns: a few minutes", "speed",
                                      "toolkit-bench-", only_strategies)
    if args.strategies and args.json and not args.json.exists():  # checked before minutes of turns, not after
        raise SystemExit(f"--json {args.json}: no results to put the strategy rows in; run without --strategies first")
    if args.preload and not args.strategies:
        raise SystemExit("--preload is for the strategy table: give --strategies too")
    bench = Bench(mode, work, args.preload)
    started = time.time()
    bench.prepare()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    if args.strategies:
        rows = bench.strategies(args.strategies)
        print(json.dumps(rows, indent=2))
        if args.json:
            results = json.loads(args.json.read_text())
            detail = results["detail"]
            earlier = {c: r for c, r in detail.get("strategies", {}).items() if "ddp_tokens_per_s" in r}  # in turns
            runs = detail.get("strategies_runs", []) if set(earlier) - set(rows) else []  # the runs whose rows stay
            detail["strategies"] = {**earlier, **rows}
            detail["strategies_runs"] = [*runs, {"command": command, "minutes": round(time.time() - started) // 60,
                                                 "configs": sorted(rows)}]
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
            if args.results:
                from report import write_speed_section
                write_speed_section(results, args.results)
        return
    throughput = bench.throughput()
    detail = {"throughput": throughput, "mfu": bench.mfu(throughput[1]), "packing": bench.packing(),
              "state_memory": bench.state_memory(), "adam8bit": bench.adam8bit()}
    if MODES[mode]["configs"]:
        configs = sorted(p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml") if p.stem not in ("single", "ddp"))
        detail.update(strategies=bench.strategies(configs), checkpoint=bench.checkpoint(),
                      preprocessing=bench.preprocessing(), activation_checkpointing=bench.activation_checkpointing())
    results = {
        "throughput_vs_reference": min(t["vs_reference"] for t in throughput.values()),
        "throughput_vs_trainer": min(t["vs_trainer"] for t in throughput.values()),
        "mfu_vs_matmul_peak": detail["mfu"]["ratio"],
        "packing_useful_tokens_speedup": detail["packing"]["ratio"],
        "zero3_state_memory_vs_ddp": detail["state_memory"]["ratio"],
        "adam8bit_state_vs_adamw": detail["adam8bit"]["ratio"],
        "mode": mode, "machine": machine(), "seconds": round(time.time() - started), "detail": detail,
        "command": command,
    }
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.results:
        from report import write_speed_section
        write_speed_section(results, args.results)


def machine() -> str:
    import platform

    import torch
    import transformers

    return (f"{cores()} CPU cores ({platform.processor() or platform.machine()}), "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
