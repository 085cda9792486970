"""Validation happens once, before any process starts; a rank only asserts (issue 9 part 2, as
issue 15 asks of the launcher): the rank gets the validated config and what the CLI checked of the
corpus, and refuses a corpus that changed in between."""

from __future__ import annotations

import pytest
import torch

from paratrain.config import TrainConfig
from paratrain.data import CorpusCheck, load_corpus
from paratrain.launch import RankEnv
from paratrain.train import setup

CFG = TrainConfig(model="tiny", steps=1, global_batch=2, seq_len=16)


@pytest.fixture()
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("print('hello')\n" * 300)
    return load_corpus(str(tmp_path / "a.txt"))


def test_a_checked_config_is_not_validated_again(corpus, monkeypatch):
    def refuse(self):
        raise AssertionError("validated twice")

    monkeypatch.setattr(TrainConfig, "validate", refuse)
    s = setup(CFG, RankEnv(), torch.device("cpu"), corpus, checked=CorpusCheck.of(corpus))
    assert s.corpus is corpus
    with pytest.raises(AssertionError, match="validated twice"):  # a library caller: the one rule, here
        setup(CFG, RankEnv(), torch.device("cpu"), corpus)


def test_a_corpus_that_changed_after_the_check_is_refused(corpus, tmp_path):
    (tmp_path / "b.txt").write_text("print('other')\n" * 300)
    other = load_corpus(str(tmp_path / "b.txt"))
    assert len(other.train) == len(corpus.train)  # same sizes: only the bytes differ
    with pytest.raises(RuntimeError, match="the data changed after"):
        setup(CFG, RankEnv(), torch.device("cpu"), other, checked=CorpusCheck.of(corpus))
