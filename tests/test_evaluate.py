"""toolkit.evaluate: numbers checked against plain transformers, 1 vs 2 processes, ZeRO-3/FSDP
checkpoints vs their exports, LoRA adapter vs merged model, and bad input."""

import json
import math

import pytest
import torch

from conftest import ACCELERATE_CONFIGS, launch, metrics, tiny_run

# fp32 on CPU. The toolkit scores documents in padded batches, the references one at a time:
# matmuls over other shapes round differently, ~1e-7 relative per token (measured); 1e-5 is far
# below any real bug (a token scored twice or missed, a wrong shift or mask moves the loss by >1e-3).
RTOL = 1e-5
FP32 = ["--mixed_precision", "no"]


def evaluate(args: list[str], config: str | None = None, **kwargs):
    extra = FP32 if config else ()
    return launch("toolkit.evaluate", [str(a) for a in args], config=config, extra=extra, **kwargs)


def report(path) -> list[dict]:
    return json.loads(path.read_text())["results"]


def assert_same_numbers(a: dict, b: dict, rel: float = RTOL):
    assert (a["tokens"], a["documents"]) == (b["tokens"], b["documents"])
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        assert b[key] == pytest.approx(a[key], rel=rel), key


@pytest.fixture(scope="module")
def docs(text_data, tmp_path_factory):
    """7 short documents: with micro batch 2 on 2 ranks the last batch is uneven (7 = 4 + 3)."""
    path = tmp_path_factory.mktemp("heldout") / "seven.jsonl"
    path.write_text("".join(text_data.read_text().splitlines(keepends=True)[-7:]))
    return path


@pytest.fixture(scope="module")
def run(text_data, tmp_path_factory):
    """One process, checkpoints at steps 2 and 4, then final/."""
    out = tmp_path_factory.mktemp("run")
    launch("toolkit.train", tiny_run(text_data, out, **{"checkpoint.every": 2, "checkpoint.keep_last": 0}),
           config=None)
    return out


def reference(model_dir, texts, packed_block=None) -> dict:
    """The same metrics with plain transformers, one sequence at a time, written independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nll = tokens = correct = 0.0

    def score(ids: list[int]):
        """Add the predictions of ids[1:], each given everything before it."""
        nonlocal nll, tokens, correct
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1)  # position i predicts token i + 1
        for i in range(len(ids) - 1):
            nll -= logp[i, ids[i + 1]].item()
            correct += int(logits[i].argmax().item() == ids[i + 1])
            tokens += 1

    encoded = [tokenizer(t)["input_ids"] for t in texts]
    n_bytes = sum(len(t.encode()) for t in texts)
    if packed_block:  # documents back to back, cut into full blocks, the tail dropped
        stream = [t for ids in encoded for t in ids]
        n_bytes = 0  # the text a block scores: its tokens after the first, decoded
        for start in range(0, len(stream) - packed_block + 1, packed_block):
            score(stream[start:start + packed_block])
            n_bytes += len(tokenizer.decode(stream[start + 1:start + packed_block], skip_special_tokens=True).encode())
    for ids in [] if packed_block else encoded:
        assert len(ids) <= model.config.max_position_embeddings
        score(ids)
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "accuracy": correct / tokens,
            "bits_per_byte": nll / (math.log(2) * n_bytes), "tokens": int(tokens), "documents": len(texts)}


def texts_of(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_every_checkpoint_of_a_run_equals_plain_transformers(run, docs, tmp_path):
    out = evaluate(["--checkpoint", run / "checkpoints", "--data", docs, "--report", tmp_path / "r.json"])
    rows = report(tmp_path / "r.json")
    assert [(r["checkpoint"].split("/")[-1], r["step"]) for r in rows] == [
        ("step-000002", 2), ("step-000004", 4), ("final", 4)]
    assert json.loads((run / "final" / "export_info.json").read_text()) == {"step": 4}  # final's step, recorded
    expected = reference(run / "final", texts_of(docs))
    assert expected["tokens"] > 500
    assert_same_numbers(expected, rows[2])  # final/
    assert_same_numbers(expected, rows[1])  # the resumable checkpoint of the same step
    assert rows[0]["loss"] > rows[1]["loss"] + 1e-3  # step 2 is another model (training moved it)
    assert "step-000004" in out.stdout and "perplexity" in out.stdout  # the table
    assert (tmp_path / "r.png").stat().st_size > 1000  # the plot next to the report
    assert json.loads((tmp_path / "r.json").read_text())["best"] == rows[1]["checkpoint"]


def strided_reference(model_dir, texts, max_length: int, stride: int) -> dict:
    """The sliding-window loop of the transformers perplexity guide: windows start every `stride`
    tokens, each scores the tokens the previous window did not reach; the model's own loss. (Not
    the toolkit's windowing: its last window is shorter, so the test uses documents whose windows
    both place alike: (length - max_length) % stride == 0.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nll = tokens = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        prev_end = 0
        for begin in range(0, ids.size(1), stride):
            end = min(begin + max_length, ids.size(1))
            window = ids[:, begin:end]
            labels = window.clone()
            labels[:, :-(end - prev_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            with torch.no_grad():
                nll += model(window, labels=labels).loss.item() * scored
            tokens += scored
            prev_end = end
            if end == ids.size(1):
                break
    return {"loss": nll / tokens, "tokens": int(tokens)}


def test_rolling_windows_equal_the_strided_loop_of_the_transformers_guide(run, text_data, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    lines = text_data.read_text().splitlines(keepends=True)
    aligned = [line for line in lines if (n := len(tokenizer(json.loads(line)["text"])["input_ids"])) > 16 + 2 * 5
               and (n - 16) % 5 == 0][:6]
    assert len(aligned) == 6
    (tmp_path / "aligned.jsonl").write_text("".join(aligned))
    texts = texts_of(tmp_path / "aligned.jsonl")
    args = ["--checkpoint", run / "final", "--data", tmp_path / "aligned.jsonl"]
    evaluate(args + ["--max-length", 16, "--stride", 5, "--report", tmp_path / "rolling.json"])
    ours, expected = report(tmp_path / "rolling.json")[0], strided_reference(run / "final", texts, 16, 5)
    assert ours["tokens"] == expected["tokens"]
    assert ours["loss"] == pytest.approx(expected["loss"], rel=RTOL)
    # the same tokens scored whole (one window per document) give another loss: less context
    # per token in rolling windows (by ~2e-4 relative for this barely trained model, 20x RTOL)
    evaluate(args + ["--report", tmp_path / "whole.json"])
    whole = report(tmp_path / "whole.json")[0]
    assert whole["tokens"] == ours["tokens"] and whole["loss"] != pytest.approx(ours["loss"], rel=1e-4)


def test_packed_blocks_equal_hand_written_ones(run, docs, tmp_path):
    texts = texts_of(docs)
    evaluate(["--checkpoint", run / "final", "--data", docs, "--packed", "--max-length", 32,
              "--report", tmp_path / "packed.json"])
    packed, expected = report(tmp_path / "packed.json")[0], reference(run / "final", texts, packed_block=32)
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte"):
        assert packed[key] == pytest.approx(expected[key], rel=RTOL), key
    assert packed["tokens"] == expected["tokens"] and packed["tokens"] % 31 == 0
    assert packed["documents"] == 7  # each document starts in some block (with its BOS)


@pytest.mark.distributed
def test_two_processes_count_every_document_once_and_equal_one(run, docs, tmp_path):
    args = ["--checkpoint", run / "checkpoints", "--data", docs, "--batch-size", 2]
    evaluate(args + ["--report", tmp_path / "one.json"])
    evaluate(args + ["--report", tmp_path / "two.json"], config="ddp")
    one, two = report(tmp_path / "one.json"), report(tmp_path / "two.json")
    assert json.loads((tmp_path / "two.json").read_text())["num_processes"] == 2
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["documents"] == 7  # the padding duplicate of the uneven last batch is dropped
        assert_same_numbers(a, b)


def sharded_run(text_data, tmp_path_factory, config: str):
    out = tmp_path_factory.mktemp(config)
    launch("toolkit.train", tiny_run(text_data, out, **{"train.micro_batch_size": 2, "checkpoint.every": 2,
                                                        "checkpoint.keep_last": 0}), config=config, extra=FP32)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_sharded_checkpoint_equals_its_export(config, text_data, tmp_path_factory, tmp_path):
    if not (ACCELERATE_CONFIGS / f"{config}.yaml").is_file():
        pytest.fail(f"accelerate_configs/{config}.yaml is missing")
    out = sharded_run(text_data, tmp_path_factory, config)
    # the run's own held-out split (from its config.yaml), with greedy samples: every rank generates
    proc = evaluate(["--checkpoint", out / "checkpoints", "--report", tmp_path / "r.json", "--generate", "The",
                     "--max-new-tokens", 4], config=config)
    step2, step4, final = report(tmp_path / "r.json")
    assert (step4["step"], final["step"]) == (4, 4) and final["checkpoint"].endswith("final")
    assert_same_numbers(final, step4)
    assert step2["loss"] != pytest.approx(step4["loss"], rel=1e-3)
    assert proc.stdout.count("'The' -> ") == 3

    # the export under plain transformers (one process) agrees
    evaluate(["--checkpoint", out / "final", "--report", tmp_path / "plain.json"])
    assert_same_numbers(final, report(tmp_path / "plain.json")[0])

    # the sharded checkpoint under another launch (one plain process): consolidated on CPU, same numbers
    evaluate(["--checkpoint", out / "checkpoints" / "step-000004", "--report", tmp_path / "one.json"])
    assert_same_numbers(step4, report(tmp_path / "one.json")[0])


def test_lora_adapter_evaluates_like_its_merged_model(text_data, tmp_path):
    out = tmp_path / "lora"
    launch("toolkit.train", tiny_run(text_data, out, **{"lora.enabled": "true", "lora.merge": "true",
                                                        "optim.lr": 1e-2, "eval.every": 4, "eval.max_batches": 0}),
           config=None)
    evaluate(["--checkpoint", out / "final", "--report", tmp_path / "adapter.json"])
    evaluate(["--checkpoint", out / "final" / "merged", "--report", tmp_path / "merged.json"])
    adapter, merged = report(tmp_path / "adapter.json")[0], report(tmp_path / "merged.json")[0]
    assert_same_numbers(merged, adapter)
    # and both equal training's own evaluation of the same held-out split at the last step, which
    # the adapter visibly moved away from the step-0 baseline
    _, evals = metrics(out)
    assert merged["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=RTOL)
    assert merged["documents"] == evals[-1]["eval_documents"]
    assert abs(evals[0]["eval_loss"] - merged["loss"]) > 1e-2


def test_a_run_directory_names_every_checkpoint_and_final_or_final_alone(run, tmp_path):
    import shutil

    from toolkit.evaluate import find_targets

    assert [(t.kind, t.step) for t in find_targets(str(run))] == [("state", 2), ("state", 4), ("model", 4)]
    no_checkpoints = tmp_path / "run"  # a run with checkpoint.every=0
    no_checkpoints.mkdir()
    shutil.copy(run / "config.yaml", no_checkpoints)
    shutil.copytree(run / "final", no_checkpoints / "final")
    [final] = find_targets(str(no_checkpoints))
    assert (final.path, final.kind, final.step) == (no_checkpoints / "final", "model", 4)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", ["missing checkpoint", "empty data", "not a model"])
def test_bad_input_is_one_clear_error(case, run, tmp_path):
    report_file = tmp_path / "kept.json"
    report_file.write_text("earlier results\n")
    checkpoint, data, named = run / "final", None, None
    if case == "missing checkpoint":
        checkpoint = named = tmp_path / "no-such-run" / "final"
    elif case == "empty data":
        data = named = tmp_path / "empty.jsonl"
        data.write_text("")
    else:
        checkpoint = named = tmp_path / "notes"
        checkpoint.mkdir()
        (checkpoint / "readme.txt").write_text("not a model")
    args = ["--checkpoint", checkpoint, "--report", report_file] + (["--data", data] if data else [])
    proc = evaluate(args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and str(named) in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert report_file.read_text() == "earlier results\n"  # nothing already written is touched


def test_data_errors_name_what_evaluate_takes(run, tmp_path):
    """Evaluate has no data.* keys: its errors name its own options, not training's."""
    columns = tmp_path / "columns.jsonl"
    columns.write_text('{"body": "some text"}\n')
    proc = evaluate(["--checkpoint", run / "final", "--data", columns], check=False)
    [line] = error_lines(proc)
    assert "['body']" in line and "rename the data's columns" in line and "data.text_field" not in line, line
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "some text"}\n')
    proc = evaluate(["--checkpoint", run / "final", "--data", docs, "--max-length", 100000], check=False)
    [line] = error_lines(proc)
    assert "--max-length=100000 is longer than the model allows" in line and "data.block_size" not in line, line
