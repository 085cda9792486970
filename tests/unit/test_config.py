"""Validation of layouts and training configs: every invalid input names what is valid."""

import re

import pytest

from paratrain.config import Layout, TrainConfig, padded_vocab_size, valid_tp, vocab_padding_note
from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig, get_model_config

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


def test_padded_vocab_size():
    # unchanged when tp divides V; else the next multiple of 64 tp (Megatron pads to 128 tp)
    assert [padded_vocab_size(256, t) for t in (1, 2, 4)] == [256, 256, 256]
    assert [padded_vocab_size(257, t) for t in (1, 2, 4)] == [257, 384, 512]
    assert [padded_vocab_size(50257, t) for t in (1, 2, 3, 4, 8)] == [50257, 50304, 50304, 50432, 50688]


def test_vocabulary_does_not_limit_tp_it_is_padded():
    gpt2 = get_model_config("gpt2-124m")  # 50257 = 29 x 1733, 12 heads
    assert valid_tp(gpt2) == [1, 2, 3, 4, 6, 12]
    for t in (2, 4, 8):
        Layout(tp=t).validate(get_model_config("gpt-7b"), 8, 64)
    odd = get_model_config("tiny-odd")
    assert valid_tp(odd) == [1, 2, 4]
    Layout(tp=4, sequence_parallel=True).validate(odd, 8, 64)
    assert vocab_padding_note(odd, 2) == ("vocabulary 257 padded to 384 for tp=2 (192 rows per rank; the 127 "
                                          "padding rows are zero and masked out of the loss)")
    assert vocab_padding_note(odd, 1) is None and vocab_padding_note(TINY, 4) is None


@pytest.mark.parametrize("model,tp,what", [
    (TINY, 3, "attention heads (4)"),
    (ModelConfig("f", num_layers=1, hidden=8, num_heads=8, vocab_size=7, max_seq_len=8, ffn_hidden=20), 8,
     "MLP width (20)"),
])
def test_tp_must_divide_heads_and_mlp_width(model, tp, what):
    """The vocabulary no longer stops tp; the other split dimensions still do, named in the error
    (the hidden size is a multiple of the heads, so it never fails first)."""
    with pytest.raises(ConfigError, match=f"tp={tp} does not divide the model's " + re.escape(what)) as e:
        Layout(tp=tp).validate(model, 8, 8)
    assert f"Valid tp values for {model.name!r}: {valid_tp(model)}." in str(e.value)


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
