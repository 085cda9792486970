"""Invalid pipeline inputs are refused before anything starts: exit 2, what is wrong, what is valid."""

from __future__ import annotations

import pytest

from paratrain.cli import main
from paratrain.config import Layout, TrainConfig

BAD = {
    "pp above layers": (["--pp", "8"], "pp=8 pipeline stages, but model 'tiny' has only 4 layers"),
    "chunks above layers": (["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "4", "--microbatches", "2"],
                            "pp=2 x virtual_stages=4 = 8 pipeline stages"),
    "microbatches vs batch": (["--pp", "2", "--global-batch", "8", "--microbatches", "3"],
                              "cannot be split into 3 equal micro-batches; valid micro-batch counts are [1, 2, 4, 8]"),
    "interleaved groups": (["--pp", "4", "--schedule", "interleaved", "--microbatches", "6", "--global-batch", "12"],
                           "microbatches must be a multiple of pp=4 (got 6); valid: 4, 8, 12"),
    "chunks without interleaving": (["--pp", "2", "--virtual-stages", "2"], "needs schedule 'interleaved'"),
    "stage layers sum": (["--pp", "2", "--stage-layers", "3,2"], "summing to the 4 layers of model 'tiny'"),
    "stage layers count": (["--pp", "2", "--stage-layers", "2,1,1"], "needs 2 counts of at least 1"),
    "stage layers zero": (["--pp", "2", "--stage-layers", "0,4"], "needs 2 counts of at least 1"),
    "stage layers without pp": (["--stage-layers", "4"], "needs --pp 2 or more"),
    "speeds count": (["--pp", "2", "--stage-speeds", "1,2,3"], "one positive number per pipeline rank (pp=2)"),
    "speeds zero": (["--pp", "2", "--stage-speeds", "1,0"], "one positive number per pipeline rank"),
    "layers and speeds": (["--pp", "2", "--stage-layers", "2,2", "--stage-speeds", "1,2"], "not both"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipeline_input_exits_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, message = BAD[case]
    assert main(["train", "--steps", "1", *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err, err
    assert not (tmp_path / "runs").exists(), "nothing may start before validation passes"


def test_unparsable_stage_layers_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--pp", "2", "--stage-layers", "3,x"])
    assert e.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_valid_pipeline_layouts():
    cfg = TrainConfig(layout=Layout(pp=2, microbatches=4, stage_layers=[1, 3]))  # a list from a config file
    cfg.validate()
    assert cfg.layout.stage_layers == (1, 3) and hash(cfg)
    assert str(cfg.layout) == "dp=1 pp=2 tp=1 mb=4 1f1b stages=1,3"
    TrainConfig(layout=Layout(pp=2, microbatches=2, schedule="interleaved", virtual_stages=2)).validate()
    TrainConfig(layout=Layout(pp=2, stage_speeds=(1, 2.5))).validate()
