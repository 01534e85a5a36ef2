"""The run config: defaults and their sources, YAML + CLI precedence, one-line validation errors."""

import dataclasses
from pathlib import Path

import pytest

from iris_ref.config import (
    EMBEDDED_DEFAULTS,
    PAPER_DEFAULTS,
    ConfigError,
    IrisConfig,
    config_from_dict,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_option_documents_its_default():
    for f in dataclasses.fields(IrisConfig):
        assert len(f.metadata.get("help", "")) > 15, f.name


def test_paper_defaults_with_model():
    config = parse_config(["--model", "some/model"])
    assert config.beta == 0.1 and config.learning_rate == 5e-7 and config.optimizer == "rmsprop"
    assert config.warmup_ratio == 0.1 and config.global_batch_size == 64 and config.epochs == 2
    assert config.max_length == 1024 and config.max_prompt_length == 512 and config.max_new_tokens == 512
    assert config.num_samples == 50000 and config.temperature == 1.0 and config.top_p == 1.0
    assert config.alpha_schedule == "adaptive" and config.alpha_min == 0.5 and config.alpha_max == 2.0
    assert config.mu == 1.0 and config.sft_epochs == 0
    assert config.dataset == "HuggingFaceH4/ultrachat_200k" and config.split == "train_sft"
    assert config.output_dir == str(Path("runs") / "model-iris")
    for key, value in PAPER_DEFAULTS.items():
        assert getattr(config, key) == value, key


def test_space_uses_its_papers_beta_unless_given():
    assert parse_config(["--model", "m", "--loss", "space"]).beta == 1.0
    assert parse_config(["--model", "m", "--loss", "space", "--beta", "0.3"]).beta == 0.3


def test_embedded_defaults_without_model():
    config = parse_config([])
    assert config.embedded and config.model is None and config.device == "cpu" and not config.bf16
    for key, value in EMBEDDED_DEFAULTS.items():
        assert getattr(config, key) == value, key
    assert config.max_new_tokens == config.max_length - config.max_prompt_length


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: spin\nlearning-rate: 0.01\niters: 5\nbeta: 0.5\n")
    config = parse_config(["--config", str(path), "--iters", "2", "--beta", "0.25"])
    assert (config.loss, config.learning_rate, config.iters, config.beta) == ("spin", 0.01, 2, 0.25)


def test_shipped_configs_parse():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = parse_config(["--config", str(path), "--device", "cpu", "--bf16", "false", "--gradient-checkpointing", "false"])
        assert config.iters >= 1, path


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--alpha", "0", "--alpha-schedule", "constant"], "--alpha must be > 0"),
        (["--alpha", "-1"], "--alpha must be > 0"),
        (["--alpha-min", "0"], "--alpha-min must be > 0"),
        (["--alpha-min", "3", "--alpha-max", "2"], "larger than --alpha-max"),
        (["--micro-batch-size", "5", "--global-batch-size", "32"], "does not divide"),
        (["--max-prompt-length", "64", "--max-length", "64"], "must be smaller than --max-length"),
        (["--max-new-tokens", "100", "--max-length", "64", "--max-prompt-length", "32"], "exceeds"),
        (["--bf16"], "needs CUDA"),
        (["--device", "tpu"], "--device"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--top-p", "1.5"], "--top-p"),
        (["--iters", "0"], "--iters"),
        (["--resume", "--overwrite"], "contradict"),
        (["--reward-bound", "2"], "only applies to --loss spif"),
        (["--loss", "dpo"], "invalid choice"),
        (["--no-such-option", "1"], "unrecognized arguments"),
        (["--config", "/definitely/missing.yaml"], "config file not found"),
    ],
)
def test_bad_options_give_one_line_errors(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    message = str(info.value)
    assert fragment in message and "\n" not in message


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


def test_tiny_yaml_is_the_embedded_default():
    assert parse_config(["--config", str(REPO / "configs" / "tiny.yaml")]) == parse_config([])


def test_fsdp_flag_is_shorthand_for_parallel_fsdp():
    assert parse_config(["--model", "m", "--fsdp"]).parallel == "fsdp"
    assert parse_config(["--model", "m"]).parallel == "auto"
    with pytest.raises(ConfigError, match="--fsdp contradicts --parallel ddp"):
        parse_config(["--model", "m", "--fsdp", "--parallel", "ddp"])
