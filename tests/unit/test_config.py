"""Validation of layouts and training configs: every invalid input names what is valid."""

import pytest

from paratrain.config import Layout, TrainConfig, valid_tp
from paratrain.errors import ConfigError
from paratrain.models.configs import get_model_config

TINY = get_model_config("tiny")


def test_default_config_is_valid():
    assert TrainConfig().validate().name == "tiny"


@pytest.mark.parametrize("layout,batch,match", [
    (Layout(dp=3), 32, "not divisible by dp=3"),
    (Layout(dp=2, microbatches=3), 32, "valid micro-batch counts are"),
    (Layout(tp=3), 32, "tp=3 does not divide"),
    (Layout(pp=5), 32, "only 4 layers"),
    (Layout(pp=2, schedule="interleaved", virtual_stages=2, microbatches=3), 36, "multiple of pp=2"),
    (Layout(dp=0), 32, "dp must be a positive integer"),
    (Layout(zero=4), 32, "zero must be one of"),
    (Layout(schedule="zigzag"), 32, "schedule must be one of"),
    (Layout(virtual_stages=2), 32, "needs schedule 'interleaved'"),
    (Layout(sequence_parallel=True), 32, "sequence parallelism needs tp > 1"),
])
def test_layout_errors(layout, batch, match):
    with pytest.raises(ConfigError, match=match):
        layout.validate(TINY, batch, 64)


def test_seq_len_beyond_model():
    with pytest.raises(ConfigError, match="exceeds model 'tiny'"):
        Layout().validate(TINY, 8, TINY.max_seq_len + 1)


def test_valid_tp_lists_divisors():
    assert valid_tp(TINY) == [1, 2, 4]


@pytest.mark.parametrize("changes,match", [
    (dict(nproc=3), "does not match the layout"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(model="gpt5"), "unknown model 'gpt5'. Valid names are: tiny"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(global_batch=-1), "global_batch must be a positive integer"),
])
def test_train_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**changes).validate()


def test_layout_str_is_one_line():
    assert str(Layout(dp=2, pp=2, tp=2, microbatches=4)) == "dp=2 pp=2 tp=2 mb=4 1f1b"
