"""Config: YAML + key.sub=value overrides; unknown keys and wrong types name the key."""

import pytest

from lorafuse.engine.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model: m\ndata: {train: t.jsonl}\ntrain: {lr: 1.0e-4, epochs: 2}\n")
    cfg = load_config(path, ["train.lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "lora.r=4"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 2 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_tokens_per_step == 4096  # default kept


@pytest.mark.parametrize("text, message", [
    ("model: m\ntrian: {lr: 1}\n", "unknown config key 'trian'"),
    ("model: m\ntrain: {learning_rate: 1}\n", "unknown config key 'train.learning_rate'"),
    ("model: m\ntrain: {epochs: two}\n", "config key 'train.epochs' must be int, got 'two'"),
    ("model: m\ntrain: {epochs: 1.5}\n", "config key 'train.epochs' must be int"),
    ("model: m\nlora: {use_rslora: 1}\n", "config key 'lora.use_rslora' must be bool"),
    ("model: m\nlora: {target_modules: q_proj}\n", "config key 'lora.target_modules' must be list[str]"),
    ("model: m\ntrain: {dtype: fp8}\n", "config key 'train.dtype' must be one of"),
    ("model: m\nlora: 3\n", "'lora' must be a mapping"),
    ("model: m\ntrain: {max_seq_len: 9000}\n", "exceeds train.max_tokens_per_step"),
    ("model: m\nlora: {dropout: 1.5}\n", "'lora.dropout' must be in [0, 1)"),
    ("- a list\n", "top level must be a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(write(tmp_path, "model: m\n"), ["train.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(write(tmp_path, "model: m\n"), ["train.lrr=1"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused_by_name(tmp_path, value):
    with pytest.raises(ConfigError, match="config key 'train.lr' must be a finite number"):
        load_config(write(tmp_path, "model: m\n"), [f"train.lr={value}"])
    with pytest.raises(ConfigError, match="config key 'lora.alpha' must be a finite number"):
        load_config(write(tmp_path, f"model: m\nlora: {{alpha: {value}}}\n"))
    with pytest.raises(ConfigError, match="'train.lr' must be positive"):
        load_config(write(tmp_path, "model: m\n"), ["train.lr=0"])


def test_a_directory_or_a_byte_order_mark(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; expected a YAML config file"):
        load_config(tmp_path)
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel: m\ntrain: {epochs: 3}\n")
    assert load_config(path).train.epochs == 3
