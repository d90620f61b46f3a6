import pytest
import yaml

from toolkit import config
from toolkit.config import UserError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_are_typed(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl, block_size: 64}\ntrain: {max_steps: 10}\n")
    cfg = config.load(path, ["train.max_steps=200", "optim.lr=1e-4", "lora.target_modules=q_proj,k_proj",
                             "data.eval=b.jsonl", "model.gradient_checkpointing=true", "train.epochs=2"])
    assert cfg.data.block_size == 64 and cfg.train.max_steps == 200
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.gradient_checkpointing is True and cfg.train.epochs == 2.0


def test_defaults_fill_unset_keys(tmp_path):
    cfg = config.load(None, ["data.train=x.txt"])
    assert cfg.resume == "none" and cfg.checkpoint.keep_last == 2 and cfg.eval.every == 0


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key train.max_step (did you mean train.max_steps?)"),
    ("trian.max_steps=3", "unknown config key trian"),
    ("train.max_steps=many", "train.max_steps must be int, got 'many'"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0"),
    ("optim.name=sgd", "optim.name must be one of"),
    ("data.format=csv", "data.format must be one of"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
    ("lora.merge=true", "lora.merge=true needs lora.enabled=true"),
    ("train.max_steps", "is not key=value"),
    ("model.dropout=1.5", "dropout must be in [0, 1)"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(UserError, match=None) as err:
        config.load(None, ["data.train=x.txt", override])
    assert message in str(err.value)


def test_profiled_steps_must_fit_in_the_run():
    base = ["data.train=x.txt", "train.max_steps=4"]
    with pytest.raises(UserError, match="^train.profile_steps=3 records steps 3 to 5 but train.max_steps is 4: raise"):
        config.load(None, [*base, "train.profile_steps=3"])
    assert config.load(None, [*base, "train.profile_steps=2"]).train.profile_steps == 2
    config.load(None, ["data.train=x.txt", "train.profile_steps=9"])  # epochs: steps unknown until the data is read


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML at line"):
        config.load(write(tmp_path, "train:\n  max_steps: [1\n"))
    with pytest.raises(UserError, match="must hold a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="data.train is not set"):
        config.load(None)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = config.load(None, ["data.train=x.txt", "train.max_steps=5", "lora.enabled=true"])
    cfg.runtime = {"num_processes": 2}
    config.save(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["runtime"]["num_processes"] == 2


def test_every_example_config_is_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        config.load(path)


def test_one_value_is_printed_for_job_scripts(tmp_path, capsys):
    """`python -m toolkit.config --get KEY` (examples/slurm/train.sbatch reads output_dir so)."""
    (tmp_path / "run.yaml").write_text("output_dir: runs/a\ndata:\n  train: d.jsonl\ntrain:\n  max_steps: 7\n")
    config.main(["--config", str(tmp_path / "run.yaml"), "--get", "output_dir", "output_dir=runs/b"])
    config.main(["--config", str(tmp_path / "run.yaml"), "--get", "train.max_steps"])
    assert capsys.readouterr().out.split() == ["runs/b", "7"]
    with pytest.raises(UserError, match="train.nope is not a config key"):
        config.main(["--config", str(tmp_path / "run.yaml"), "--get", "train.nope"])


def test_a_flag_for_a_run_config_key_names_the_override_to_write():
    from toolkit.train import parse_args

    with pytest.raises(UserError) as error:
        parse_args(["--config", "examples/x.yaml", "--max_steps", "10", "--lr=3e-4", "data.train=a.jsonl"])
    message = str(error.value)
    assert message.startswith("unrecognized arguments: --max_steps --lr=3e-4;") and "\n" not in message
    assert message.endswith("write train.max_steps=10 optim.lr=3e-4")
    with pytest.raises(UserError, match="see --help for the keys"):
        parse_args(["--no-such-thing"])


def test_the_readme_config_reference_is_the_generated_one():
    """README.md's table is `python -m toolkit.config --reference`: every key, its default and its
    docstring, so it cannot drift from the dataclasses (regenerate it after changing a field)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin = readme.index("<!-- config-reference:begin")
    table = readme[readme.index("\n", begin) + 1:readme.index("<!-- config-reference:end -->")].strip()
    assert table == config.reference_table()
    assert all(f"| `{key}` |" in table for key in ("model.revision", "data.split", "data.eval_split",
                                                   "data.text_field", "checkpoint.max_shard_size"))


def test_sample_prompts_are_a_list_or_a_text_file(tmp_path):
    from toolkit.validation import sample_prompts

    cfg = config.load(None, ["data.train=x.txt", "eval.sample_prompts=[The river,Once upon a time]"])
    assert sample_prompts(cfg.eval.sample_prompts) == ["The river", "Once upon a time"]
    (tmp_path / "prompts.txt").write_text("The river\n\nOnce upon a time\n")
    cfg = config.load(None, ["data.train=x.txt", f"eval.sample_prompts={tmp_path / 'prompts.txt'}"])
    assert sample_prompts(cfg.eval.sample_prompts) == ["The river", "Once upon a time"]
    with pytest.raises(UserError, match="eval.sample_prompts=missing.txt is not a .txt file"):
        config.load(None, ["data.train=x.txt", "eval.sample_prompts=missing.txt"])
