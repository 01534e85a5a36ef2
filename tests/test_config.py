"""The run config: one source of truth for defaults, YAML + CLI precedence, one-line errors,
--resume from the saved config alone, and a readable --help."""

import datetime
import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from iris_ref import config as config_module
from iris_ref.config import EMBEDDED_CONFIG, ConfigError, IrisConfig, config_from_dict, default_run_name, parse_config


def test_every_option_documents_what_it_does_and_its_group():
    for f in dataclasses.fields(IrisConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name
        assert f.metadata["group"] in config_module.HELP_GROUPS, f.name


def test_published_defaults_with_model():
    config = parse_config(["--model", "some/model"])
    assert config.beta == 0.1 and config.learning_rate == 5e-7 and config.optimizer == "rmsprop"
    assert config.warmup_ratio == 0.1 and config.global_batch_size == 64 and config.epochs == 2
    assert config.max_length == 1024 and config.max_prompt_length == 512
    assert config.max_new_tokens is None  # each prompt's budget: max length - its length (issue 19)
    assert config.template_date == datetime.date.today().isoformat() and config.chat_template_kwargs is None
    assert config.num_samples == 50000 and config.temperature == 1.0 and config.top_p == 1.0
    assert config.alpha_schedule == "adaptive" and config.alpha_min == 0.5 and config.alpha_max == 2.0
    assert config.mu == 1.0 and config.sft_epochs == 0 and config.num_synthetic == 1
    assert config.dataset == "HuggingFaceH4/ultrachat_200k" and config.split == "train_sft"
    assert config.output_dir == os.path.abspath(os.path.join("runs", "model-iris"))
    for f in dataclasses.fields(IrisConfig):  # nothing else moved away from the field defaults
        if f.default is not None and f.name not in ("device",):
            assert getattr(config, f.name) == f.default or f.name in ("model",), f.name


def test_space_beta_and_mu_follow_their_paper_and_k():
    assert parse_config(["--model", "m", "--loss", "space"]).beta == 1.0
    assert parse_config(["--model", "m", "--loss", "space", "--beta", "0.3"]).beta == 0.3
    assert parse_config(["--model", "m", "--loss", "space", "--num-synthetic", "4"]).mu == 4.0


def test_embedded_defaults_come_from_the_one_yaml_file():
    config = parse_config([])
    assert config.embedded and config.model is None and config.device == "cpu" and not config.bf16
    embedded = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    for key, value in embedded.items():
        assert getattr(config, key) == value, key
    assert parse_config(["--config", "tiny"]) == config  # the shipped file by name is the same run
    # With --model the embedded values do not apply.
    assert parse_config(["--model", "m"]).learning_rate == IrisConfig.learning_rate


def test_no_default_is_written_twice():
    """The embedded YAML holds only values that differ from the dataclass, and the shipped
    paper configs restate no default."""
    defaults = {f.name: f.default for f in dataclasses.fields(IrisConfig)}
    for path in sorted(EMBEDDED_CONFIG.parent.glob("*.yaml")):
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            assert defaults[key.replace("-", "_")] != value, (path.name, key)


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: spin\nlearning-rate: 0.01\niters: 5\nbeta: 0.5\n")
    config = parse_config(["--config", str(path), "--iters", "2", "--beta", "0.25"])
    assert (config.loss, config.learning_rate, config.iters, config.beta) == ("spin", 0.01, 2, 0.25)


def test_shipped_configs_parse_by_name_and_by_path(tmp_path, monkeypatch):
    for name in ("qwen2.5-3b", "zephyr-7b", "tiny"):
        by_name = parse_config(["--config", name, "--device", "cpu", "--bf16", "false"])
        assert by_name.iters >= 1
    qwen = parse_config(["--config", "qwen2.5-3b"])
    assert qwen.model == "Qwen/Qwen2.5-3B" and qwen.sft_epochs == 1
    # `--config configs/qwen2.5-3b.yaml` works from a folder without that file (an installed package).
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--config", "configs/qwen2.5-3b.yaml"]).model == "Qwen/Qwen2.5-3B"


@pytest.mark.parametrize("argv, fragment", [
    (["--alpha", "0", "--alpha-schedule", "constant"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--alpha-min", "0"], "--alpha-min must be > 0"),
    (["--alpha-min", "3", "--alpha-max", "2"], "larger than --alpha-max"),
    (["--micro-batch-size", "5", "--global-batch-size", "32"], "does not divide"),
    (["--max-prompt-length", "64", "--max-length", "64"], "must be smaller than --max-length"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--chat-template-kwargs", "{bad json"], "--chat-template-kwargs must be a JSON object"),
    (["--chat-template-kwargs", "[1, 2]"], "--chat-template-kwargs must be a JSON object of options"),
    (["--template-date", "07/12/2026"], "--template-date must be a date YYYY-MM-DD"),
    (["--bf16"], "needs CUDA"),
    (["--device", "tpu"], "--device"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--top-p", "1.5"], "--top-p"),
    (["--iters", "0"], "--iters"),
    (["--num-synthetic", "0"], "--num-synthetic"),
    (["--resume", "--overwrite", "--output-dir", "x"], "contradict"),
    (["--reward-bound", "2"], "only applies to --loss spif"),
    (["--loss", "dpo"], "invalid choice"),
    (["--no-such-option", "1"], "unrecognized arguments"),
    (["--config", "/definitely/missing.yaml"], "config file not found"),
    (["--model", "m", "--sft-patience", "2"], "--sft-patience needs --sft-epochs"),
    (["--dataset", "mine.jsonl", "--sft-patience", "2", "--sft-validation-size", "0"], "--sft-patience stops on held-out NLL"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--sft-validation-size", "-0.1"], "--sft-validation-size must be a fraction in (0, 1) or a whole number of rows"),
    (["--sft-validation-size", "20.5"], "--sft-validation-size must be a fraction in (0, 1) or a whole number of rows"),
])
def test_bad_options_give_one_line_errors(argv, fragment, tmp_path):
    if "--resume" in argv:
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "config.json").write_text(json.dumps({"config": parse_config([]).to_dict()}))
        argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'"):
        parse_config(["--config", str(path)])


def test_config_round_trips_through_a_dict():
    config = parse_config(["--loss", "spif", "--reward-bound", "3"])
    assert config_from_dict(dataclasses.asdict(config)) == config
    with pytest.raises(ConfigError):
        config_from_dict({**dataclasses.asdict(config), "bogus": 1})


def test_fsdp_flag_is_shorthand_for_parallel_fsdp():
    assert parse_config(["--model", "m", "--fsdp"]).parallel == "fsdp"
    assert parse_config(["--model", "m"]).parallel == "auto"
    with pytest.raises(ConfigError, match="--fsdp contradicts --parallel ddp"):
        parse_config(["--model", "m", "--fsdp", "--parallel", "ddp"])


def test_default_output_folders_do_not_collide():
    assert default_run_name(None) == "tiny"
    assert default_run_name("Qwen/Qwen2.5-3B") == "Qwen2.5-3B"
    names = {default_run_name(f"./runs/x/iter_{t}/checkpoint") for t in range(3)}
    assert names == {"x-iter_0-checkpoint", "x-iter_1-checkpoint", "x-iter_2-checkpoint"}
    assert default_run_name("./my_sft_model") == "my_sft_model"
    assert default_run_name("runs/x/iter_3/checkpoint") == "x-iter_3-checkpoint"  # a path even if it does not exist


def test_the_default_output_folder_names_data_other_than_the_models_default(tmp_path, monkeypatch):
    """A run on one's own data does not land in the default run's folder (issue 16)."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    assert parse_config([]).output_dir == str(runs / "tiny-iris")
    assert parse_config(["--dataset", "mydata.jsonl"]).output_dir == str(runs / "tiny-mydata-iris")
    assert parse_config(["--model", "Qwen/Qwen2.5-3B"]).output_dir == str(runs / "Qwen2.5-3B-iris")
    assert parse_config(["--model", "Qwen/Qwen2.5-3B", "--dataset", "data/mydata.parquet", "--loss", "spin"]
                        ).output_dir == str(runs / "Qwen2.5-3B-mydata-spin")
    assert parse_config(["--model", "m", "--dataset", "org/chat"]).output_dir == str(runs / "m-chat-iris")
    # generic file names take their parents along, as checkpoints do
    assert default_run_name(None, "runs/x/iter_1/synthetic.jsonl") == "tiny-x-iter_1-synthetic"
    assert default_run_name(None, "/data/project/train.jsonl") == "tiny-project-train"


def test_a_saved_dataset_folder_is_local_data(tmp_path, monkeypatch):
    """A folder written by save_to_disk is a local path (made absolute); its splits default to
    train and, for held-out data, test (a saved DatasetDict's, as the hub default's test_sft)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved").mkdir()
    config = parse_config(["--dataset", "saved", "--eval-dataset", "saved"])
    assert config.dataset == config.eval_dataset == str(tmp_path / "saved")
    assert (config.split, config.eval_split) == ("train", "test")
    assert config.output_dir == str(tmp_path / "runs" / "tiny-saved-iris")
    assert parse_config(["--dataset", "saved", "--split", "train_sft"]).split == "train_sft"
    (tmp_path / "held.jsonl").write_text("{}\n")
    assert parse_config(["--dataset", "saved", "--eval-dataset", "held.jsonl"]).eval_split == "train"  # a file: any


def test_validation_size_is_a_fraction_or_a_count():
    assert parse_config([]).sft_validation_size == 0.1  # embedded: 200 of the toy task's 2000 rows
    assert parse_config(["--sft-validation-size", "64"]).sft_validation_size == 64
    assert parse_config(["--sft-validation-size", "0"]).sft_validation_size is None


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    config = parse_config(["--dataset", "data.jsonl", "--output-dir", "runs/x/"])
    assert config.dataset == str(tmp_path / "data.jsonl") and config.output_dir == str(tmp_path / "runs" / "x")


# ---------------------------------------------------------------------------------------
# --resume needs only --output-dir


def _saved_run(tmp_path, *argv) -> Path:
    config = parse_config([*argv, "--output-dir", str(tmp_path / "runs" / "x")])
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    return run_dir


def test_resume_needs_nothing_but_the_output_dir(tmp_path, monkeypatch):
    run_dir = _saved_run(tmp_path, "--loss", "spin", "--beta", "0.3", "--iters", "2")
    monkeypatch.chdir(tmp_path)
    for spelling in ("runs/x", "runs/x/", "./runs/x", str(run_dir)):
        config = parse_config(["--output-dir", spelling, "--resume"])
        assert (config.loss, config.beta, config.iters, config.resume) == ("spin", 0.3, 2, True)
        assert config.output_dir == str(run_dir)
    # from another working directory, with an absolute path
    monkeypatch.chdir(tmp_path.parent)
    assert parse_config(["--output-dir", str(run_dir), "--resume"]).loss == "spin"
    # options that only say how far or where it runs may change
    assert parse_config(["--output-dir", str(run_dir), "--resume", "--iters", "4", "--threads", "2"]).iters == 4
    # the same values given again agree
    assert parse_config(["--output-dir", str(run_dir), "--resume", "--loss", "spin", "--beta", "0.3"]).beta == 0.3


def test_resume_lists_every_disagreement_with_the_right_advice(tmp_path):
    run_dir = _saved_run(tmp_path, "--loss", "spin", "--beta", "0.3")
    with pytest.raises(ConfigError) as info:
        parse_config(["--output-dir", str(run_dir), "--resume", "--beta", "0.5", "--learning-rate", "1e-3", "--loss", "iris"])
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("--beta 0.5 (the run has 0.3)", "--learning-rate 0.001", "--loss 'iris' (the run has 'spin')"):
        assert fragment in message
    assert "drop these options" in message and "new --output-dir" not in message


def test_resume_of_a_moved_run_folder(tmp_path):
    run_dir = _saved_run(tmp_path)
    moved = tmp_path / "elsewhere"
    run_dir.rename(moved)
    config = parse_config(["--output-dir", str(moved), "--resume"])
    assert config.output_dir == str(moved)


def test_resume_of_nothing_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--output-dir", str(tmp_path / "missing"), "--resume"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no iris-ref run"):
        parse_config(["--output-dir", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(ConfigError, match="needs --output-dir"):
        parse_config(["--resume"])


# ---------------------------------------------------------------------------------------
# --help


def test_help_is_dashed_and_shows_each_default_once():
    text = config_module.format_help()
    assert "--learning_rate" not in text and "--learning-rate FLOAT" in text
    assert "(default:" not in text  # argparse's own default note would repeat ours
    block = text.split("--learning-rate FLOAT")[1].split("\n  --")[0]
    assert block.count("5e-07") == 1 and "SPIN" in block and "embedded: 0.0001" in block
    for option in ("--loss", "--alpha-schedule", "--beta", "--resume", "--generator", "--num-synthetic", "--dry-run"):
        assert f"  {option}" in text, option
    assert len(set(line for line in text.splitlines() if len(line) > 30)) == \
        len([line for line in text.splitlines() if len(line) > 30])  # no repeated text


def test_the_readme_table_is_the_config_itself():
    """The README's option table is `config.defaults_table()` verbatim: defaults and sources come
    from the dataclass, so the front door cannot drift from the code."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert config_module.defaults_table() in readme
    derived = {f.name for f in dataclasses.fields(IrisConfig) if f.default is None and f.metadata["source"]}
    assert derived - {"reward_bound", "max_new_tokens"} <= config_module.DERIVED  # none there means none  # every derived default is marked as such
    resolved = parse_config(["--model", "m"])
    for name in config_module.DERIVED - {"model"}:
        assert getattr(resolved, name) is not None or name in ("eval_dataset", "eval_split"), name
