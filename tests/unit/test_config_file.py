"""Config files as users write them (issue 15, item 5): YAML's `lr: 1e-3`, and wrong types named."""

from __future__ import annotations

import argparse

import pytest

from paratrain.cli.common import build_train_config, load_config_file
from paratrain.errors import ConfigError


def config(tmp_path, name: str, body: str):
    (tmp_path / name).write_text(body)
    return build_train_config(argparse.Namespace(config=str(tmp_path / name)))


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    cfg = config(tmp_path, "c.yaml", "lr: 1e-3\nweight_decay: 5E-2\nmin_lr_ratio: 0.1\ngrad_clip: 1\n")
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr_ratio, cfg.grad_clip) == (1e-3, 5e-2, 0.1, 1.0)
    assert isinstance(cfg.grad_clip, float)


@pytest.mark.parametrize("name, body, words", [
    ("c.yaml", 'nproc: "2"\n', ["nproc", "'2'", "an integer"]),
    ("c.yaml", "data: 123\n", ["data", "123", "a string"]),
    ("c.toml", 'lr = "fast"\n', ["lr", "'fast'", "a number"]),
    ("c.yaml", 'lr: "1e-3"\n', ["lr", "'1e-3'", "a number"]),  # quoted: the user wrote a string
    ("c.yaml", "steps: 2.5\n", ["steps", "2.5", "an integer"]),
    ("c.yaml", "checkpoint: 1\n", ["checkpoint", "true or false"]),
    ("c.yaml", "stage_speeds: [1, fast]\n", ["stage_speeds", "a list of numbers"]),
    ("c.toml", "[layout]\ndp = true\n", ["dp", "True", "an integer"]),
])
def test_a_wrong_type_names_key_value_and_type(tmp_path, name, body, words):
    (tmp_path / name).write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config_file(str(tmp_path / name))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("body, key", [("timeout_s: .nan\n", "timeout_s"), ("lr: .inf\n", "lr"),
                                       ("nproc: 0\n", "nproc"), ("layout: {dp: 0}\n", "dp")])
def test_a_bad_number_names_the_config_key(tmp_path, body, key):
    with pytest.raises(ConfigError, match=f"^{key} in config file .* must be"):
        config(tmp_path, "c.yaml", body)


def test_keys_as_the_flags_spell_them(tmp_path):
    """A user copies flags into a file: ``warmup-steps`` and ``timeout`` (the field is timeout_s)."""
    cfg = config(tmp_path, "c.yaml", "warmup-steps: 3\ntimeout: 7\n--lr: 0.01\n")
    assert (cfg.warmup_steps, cfg.timeout_s, cfg.lr) == (3, 7.0, 0.01)


def test_a_runs_own_config_json_is_a_config_file(tmp_path):
    """config.json as `paratrain train` writes it (every field, nulls and the nproc 0 default
    included) starts the same run again."""
    import dataclasses
    import json

    from paratrain.config import Layout, TrainConfig

    ran = TrainConfig(layout=Layout(dp=2, tp=2), steps=7, lr=0.01, out="runs/x")
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(ran)))
    assert config(tmp_path, "config.json", (tmp_path / "config.json").read_text()) == ran
    with pytest.raises(ConfigError, match="must hold a table"):
        config(tmp_path, "list.json", "[1, 2]")


def test_keys_may_be_spelled_like_their_flags(tmp_path):
    """A key may be written as its flag is (``timeout`` for --timeout, ``no-checkpoint`` for
    --no-checkpoint, ``quiet`` for --quiet): the negative ones switch their field off."""
    cfg = config(tmp_path, "c.toml", 'timeout = 7\nno-checkpoint = true\nquiet = true\nno_overlap = false\n')
    assert (cfg.timeout_s, cfg.checkpoint, cfg.progress, cfg.overlap) == (7.0, False, False, True)
    cfg = config(tmp_path, "d.yaml", "checkpoint: false\nprogress: true\n")  # the field names too
    assert (cfg.checkpoint, cfg.progress) == (False, True)
    (tmp_path / "e.yaml").write_text("quiet: 1\n")
    with pytest.raises(ConfigError, match="quiet = 1 .* is not true or false"):
        load_config_file(str(tmp_path / "e.yaml"))
