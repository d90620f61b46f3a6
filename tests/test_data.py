import json

import datasets
import pytest

from toolkit import data
from toolkit.config import DataConfig, ModelConfig, UserError
from toolkit.model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "What is 2 plus 2?\nAnswer: 4"] * 50
    return build_tokenizer(ModelConfig(name_or_path="tiny-opt"), texts, cache_dir=tokenizer_dir)


def test_preset_tokenizer_follows_opt_conventions(tokenizer, tokenizer_dir):
    ids = tokenizer("the lazy dog")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tokenizer.eos_token_id == 2  # OPT: </s> starts every sequence
    assert tokenizer.pad_token_id == 1 and tokenizer.pad_token == "<pad>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the lazy dog"
    # the cached tokenizer is reused, not retrained (a different corpus would give other merges)
    again = build_tokenizer(ModelConfig(name_or_path="tiny-opt"), ["zzz"], cache_dir=tokenizer_dir)
    assert again("the lazy dog")["input_ids"] == ids


def test_packing_concatenates_documents_into_full_blocks(tokenizer):
    """2500 documents: more than one batch of datasets' `map` (1000), whose tails must not be lost."""
    words = "a b c d e f g h i j k l m n o p q r s t".split()
    docs = datasets.Dataset.from_dict({"text": [" ".join(words[: 3 + i % 7]) for i in range(2500)]})
    blocks = data.tokenize_for_training(docs, tokenizer, DataConfig(train="x", block_size=64), "text")
    stream = [t for d in docs["text"] for t in tokenizer(d)["input_ids"]]
    assert all(len(b) == 64 for b in blocks["input_ids"])
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(stream) // 64 * 64]


def test_sft_masks_the_prompt_and_ends_with_eos(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["What is 2 plus 2?\nAnswer:"], "response": [" 4"]})
    ex = data.tokenize_for_training(rows, tokenizer, DataConfig(train="x", block_size=64), "sft")[0]
    prompt_len = len(tokenizer("What is 2 plus 2?\nAnswer:")["input_ids"])
    assert ex["labels"][:prompt_len] == [data.IGNORE] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert ex["input_ids"][:prompt_len] == tokenizer("What is 2 plus 2?\nAnswer:")["input_ids"]


def test_sft_drops_examples_whose_prompt_fills_the_block(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["the quick brown fox " * 20, "short"], "response": [" x", " y"]})
    out = data.tokenize_for_training(rows, tokenizer, DataConfig(train="x", block_size=8), "sft")
    assert len(out) == 1


def test_collator_pads_dynamically_and_ignores_padding():
    batch = data.Collator(pad_token_id=1)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["num_targets"] == 2  # 6 and 7: the first label has nothing before it, padding is ignored


@pytest.mark.parametrize("length, max_length, stride", [(1, 4, 2), (4, 4, 2), (5, 4, 2), (23, 8, 3), (50, 8, 7)])
def test_rolling_windows_predict_every_token_once_within_the_model_length(length, max_length, stride):
    ids = list(range(100, 100 + length))
    predicted = []
    for window, labels in data.rolling_windows(ids, max_length, stride):
        assert len(window) <= max_length and len(window) == len(labels)
        predicted += [label for label in labels[1:] if label != data.IGNORE]
    assert predicted == ids[1:]


def test_format_detection_and_errors():
    cfg = DataConfig(train="x")
    assert data.detect_format(datasets.Dataset.from_dict({"text": ["a"]}), cfg) == "text"
    assert data.detect_format(datasets.Dataset.from_dict({"prompt": ["a"], "response": ["b"]}), cfg) == "sft"
    with pytest.raises(UserError, match="data has columns \\['body'\\]"):
        data.detect_format(datasets.Dataset.from_dict({"body": ["a"]}), cfg)


def test_local_files_of_every_type_load_the_same_documents(tmp_path):
    rows = [{"text": "first document"}, {"text": "second document"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text\nfirst document\nsecond document\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.txt").write_text("first document\n\nsecond document\n")
    for ext in ("jsonl", "json", "csv", "parquet", "txt"):
        assert [t.strip() for t in data.load_source(str(tmp_path / f"d.{ext}"))["text"]] == \
            ["first document", "second document"], ext


def test_bad_data_inputs_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty: give a file with at least one document"):
        data.load_source(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is not valid JSON"):
        data.load_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.docx").write_text("a")
    with pytest.raises(UserError, match="unsupported file type"):
        data.load_source(str(tmp_path / "x.docx"))
    with pytest.raises(UserError, match="longer than the model allows"):
        data.check_block_size(4096, 2048)


def test_heldout_split_is_deterministic_and_disjoint(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    cfg = DataConfig(train=str(tmp_path / "d.jsonl"), eval_fraction=0.1)
    train1, eval1 = data.load_raw(cfg, seed=3)
    train2, eval2 = data.load_raw(cfg, seed=3)
    assert eval1["text"] == eval2["text"] and len(eval1) == 10
    assert not set(eval1["text"]) & set(train1["text"])


def test_the_preprocessing_cache_is_reused_until_the_toolkit_code_changes(tokenizer, tmp_path, monkeypatch):
    """datasets names a cache by a module-level function's name, not its code: without the module's
    own hash in the fingerprint, a toolkit whose tokenizing or packing changed would reuse old caches."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the quick brown fox {i}", "response": " jumps"}) + "\n"
                            for i in range(50)))
    cfg = DataConfig(train=str(path), block_size=16, eval_fraction=0.1)

    def blocks():
        raw, _ = data.load_raw(cfg, 42)
        out = data.tokenize_for_training(raw, tokenizer, cfg, "sft")
        return out._fingerprint, [f["filename"] for f in out.cache_files]

    first = blocks()
    assert first[1] and blocks() == first  # written to a cache file, then read back from it
    monkeypatch.setattr(data, "PIPELINE_VERSION", "another toolkit")
    changed = blocks()
    assert changed[0] != first[0] and changed[1] != first[1]
