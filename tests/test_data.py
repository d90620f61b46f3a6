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
    blocks = data.tokenize_for_training([data.Part("x", "text", docs)], tokenizer, DataConfig(train="x", block_size=64))
    stream = [t for d in docs["text"] for t in tokenizer(d)["input_ids"]]
    assert all(len(b) == 64 for b in blocks["input_ids"])
    assert [t for b in blocks["input_ids"] for t in b] == stream[: len(stream) // 64 * 64]


def test_sft_masks_the_prompt_and_ends_with_eos(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["What is 2 plus 2?\nAnswer:"], "response": [" 4"]})
    ex = data.tokenize_for_training([data.Part("x", "sft", rows)], tokenizer, DataConfig(train="x", block_size=64))[0]
    prompt_len = len(tokenizer("What is 2 plus 2?\nAnswer:")["input_ids"])
    assert ex["labels"][:prompt_len] == [data.IGNORE] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert ex["input_ids"][:prompt_len] == tokenizer("What is 2 plus 2?\nAnswer:")["input_ids"]


def test_sft_drops_examples_whose_prompt_fills_the_block(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["the quick brown fox " * 20, "short"], "response": [" x", " y"]})
    out = data.tokenize_for_training([data.Part("x", "sft", rows)], tokenizer, DataConfig(train="x", block_size=8))
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
    (train1,), (eval1,) = train1, eval1
    assert eval1.rows["text"] == eval2[0].rows["text"] and len(eval1.rows) == 10
    assert not set(eval1.rows["text"]) & set(train1.rows["text"])


def test_the_preprocessing_cache_is_reused_until_the_toolkit_code_changes(tokenizer, tmp_path, monkeypatch):
    """datasets names a cache by a module-level function's name, not its code: without the module's
    own hash in the fingerprint, a toolkit whose tokenizing or packing changed would reuse old caches."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the quick brown fox {i}", "response": " jumps"}) + "\n"
                            for i in range(50)))
    cfg = DataConfig(train=str(path), block_size=16, eval_fraction=0.1)

    def blocks():
        raw, _ = data.load_raw(cfg, 42)
        out = data.tokenize_for_training(raw, tokenizer, cfg)
        return out._fingerprint, [f["filename"] for f in out.cache_files]

    first = blocks()
    assert first[1] and blocks() == first  # written to a cache file, then read back from it
    monkeypatch.setattr(data, "PIPELINE_VERSION", "another toolkit")
    changed = blocks()
    assert changed[0] != first[0] and changed[1] != first[1]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def supervised(tokenizer, fmt: str, rows: dict, **cfg) -> list[dict]:
    part = data.Part("x", fmt, datasets.Dataset.from_dict(rows))
    return list(data.tokenize_for_training([part], tokenizer, DataConfig(**{"train": "x", "block_size": 1024, **cfg})))


def test_alpaca_rows_go_through_the_alpaca_prompt_with_and_without_input(tokenizer):
    examples = supervised(tokenizer, "alpaca", {"instruction": ["Add the numbers.", "Name a fox."],
                                                "input": ["2 and 2", ""], "output": ["4", "the quick brown fox"]})
    prompts = [
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 2\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a fox.\n\n### Response:\n"]
    for example, prompt, output in zip(examples, prompts, ["4", "the quick brown fox"]):
        prompt_ids = tokenizer(prompt)["input_ids"]  # BOS first, as every OPT sequence
        response = encode(tokenizer, output) + [tokenizer.eos_token_id]
        assert example["input_ids"] == prompt_ids + response
        assert example["labels"] == [data.IGNORE] * len(prompt_ids) + response


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"},
                {"role": "assistant", "content": "6, the lazy dog says"}]


def test_chat_trains_on_every_assistant_turn_and_its_eos_only(tokenizer):
    (example,) = supervised(tokenizer, "chat", {"messages": [CONVERSATION]})
    eos = [tokenizer.eos_token_id]
    # (text, carries loss): the shipped template's pieces, tokenized apart
    pieces = [("Be brief.\n\n### User:\nWhat is 2 plus 2?\n\n### Assistant:\n", False), ("4", True),
              ("\n\n### User:\nAnd 3 plus 3?\n\n### Assistant:\n", False), ("6, the lazy dog says", True),
              ("\n\n", False)]
    ids, labels = [tokenizer.bos_token_id], [data.IGNORE]
    for text, trained in pieces:
        piece = encode(tokenizer, text) + (eos if trained else [])
        ids += piece
        labels += piece if trained else [data.IGNORE] * len(piece)
    assert example["input_ids"] == ids
    assert example["labels"] == labels


def test_sharegpt_conversations_read_like_messages(tokenizer):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVERSATION]
    assert supervised(tokenizer, "chat", {"conversations": [sharegpt]}) == \
        supervised(tokenizer, "chat", {"messages": [CONVERSATION]})
    with pytest.raises(UserError, match="has neither a role nor a sharegpt 'from'"):
        supervised(tokenizer, "chat", {"conversations": [[{"from": "bot", "value": "hi"}]]})


def test_a_chat_template_of_ones_own_and_one_that_marks_no_replies(tokenizer, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}"
                        "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                        "{% endfor %}")
    (example,) = supervised(tokenizer, "chat", {"messages": [CONVERSATION[1:3]]}, chat_template=str(template))
    prompt = encode(tokenizer, "<user>What is 2 plus 2?<assistant>")
    assert example["input_ids"] == prompt + encode(tokenizer, "4") + [tokenizer.eos_token_id]
    assert example["labels"] == [data.IGNORE] * len(prompt) + example["input_ids"][len(prompt):]
    with pytest.raises(UserError, match="does not mark assistant replies"):
        supervised(tokenizer, "chat", {"messages": [CONVERSATION]}, chat_template="{{ messages[0]['content'] }}")


def test_format_detection_of_every_format():
    cfg = DataConfig(train="x")
    columns = {"text": {"text": ["a"]}, "sft": {"prompt": ["a"], "response": ["b"]},
               "alpaca": {"instruction": ["a"], "input": [""], "output": ["b"]},
               "chat": {"messages": [[{"role": "user", "content": "a"}]]},
               "chat ": {"conversations": [[{"from": "human", "value": "a"}]]}}
    for fmt, rows in columns.items():
        assert data.detect_format(datasets.Dataset.from_dict(rows), cfg) == fmt.strip()
    with pytest.raises(UserError, match="data.format=alpaca needs .* 'instruction'\\+'output' \\(alpaca\\)"):
        data.detect_format(datasets.Dataset.from_dict(columns["sft"]), DataConfig(train="x", format="alpaca"))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sources_mix_by_weight_reproducibly_and_each_holds_out_its_share(tokenizer, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"},
                                                               {"role": "assistant", "content": f"Hello {i}"}]}
                                                 for i in range(20)])
    cfg = DataConfig(train=[alpaca, chat], weights=[2.0, 0.5], eval_fraction=0.1, block_size=1024)
    train, held_out = data.load_raw(cfg, seed=1)
    assert [(p.format, len(p.rows), p.weight) for p in train] == [("alpaca", 36, 2.0), ("chat", 18, 0.5)]
    assert [(p.format, len(p.rows)) for p in held_out] == [("alpaca", 4), ("chat", 2)]
    mixed = data.tokenize_for_training(train, tokenizer, cfg, seed=1)
    chat_rows = [ids for ids in mixed["input_ids"] if "### User:" in tokenizer.decode(ids)]
    assert len(mixed) == 2 * 36 + 9 and len(chat_rows) == 9
    assert data.tokenize_for_training(train, tokenizer, cfg, seed=1)["input_ids"] == mixed["input_ids"]
    other = data.tokenize_for_training(train, tokenizer, cfg, seed=2)["input_ids"]
    assert sorted(map(tuple, other)) != sorted(map(tuple, mixed["input_ids"]))  # another seed, another half
    scored = data.tokenize_for_eval(held_out, tokenizer, cfg, max_length=1024)
    assert len(scored) == 6

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"document {i}"} for i in range(20)])
    with pytest.raises(UserError, match=f"data.train mixes text sources \\({text}\\) with instruction or chat"):
        data.load_raw(DataConfig(train=[alpaca, text]), seed=1)


def test_packed_chat_rows_hold_exactly_the_examples(tokenizer):
    conversations = [CONVERSATION[:1 + 2 * turns] for turns in (1, 2)] * 3
    alone = supervised(tokenizer, "chat", {"messages": conversations})
    rows = supervised(tokenizer, "chat", {"messages": conversations}, packing=True, block_size=256)
    unpacked = []
    for row in rows:
        start = 0
        for length in row["lengths"]:
            unpacked.append((row["input_ids"][start:start + length], row["labels"][start:start + length]))
            start += length
    # an example's first label is never scored in a row (nothing before it of its own); the first token is BOS
    assert sorted(unpacked) == sorted((e["input_ids"], [data.IGNORE] + e["labels"][1:]) for e in alone)
    assert len(rows) < len(alone)
