"""`paratrain train --hf gpt2|llama --hf-config ...`, as a user runs it: a Llama trains at tp 2
with the HF model's losses and a checkpoint under HF's names; bad configs are exit-2 errors
before any process starts."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import losses, paratrain
from tests.common import LOSS_RTOL

pytest.importorskip("transformers")

LLAMA = json.dumps({"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 64, "vocab_size": 256, "max_position_embeddings": 32})


def test_llama_tp2_from_the_cli_is_the_hf_model(tmp_path):
    from paratrain.checkpoint.convert import model_state
    from paratrain.config import TrainConfig
    from paratrain.reference import reference_train

    cfg_file = tmp_path / "llama.json"
    cfg_file.write_text(LLAMA)
    r = paratrain("train", "--hf", "llama", "--hf-config", str(cfg_file), "--tp", "2", "--steps", "3",
                  "--global-batch", "4", "--seq-len", "32", "--eval-every", "0", "--out", "o", "--quiet",
                  "--no-async-checkpoint", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "paratrain train: hf-llama (" in r.stdout and "dp=1 pp=1 tp=2 on 2 process(es)" in r.stdout
    ref = reference_train(TrainConfig(hf="llama", hf_config=LLAMA, steps=3, global_batch=4, seq_len=32))
    assert losses(tmp_path / "o") == pytest.approx(ref.losses, rel=LOSS_RTOL)
    state, _ = model_state(tmp_path / "o")  # gathered back to the HF model's names and shapes
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.state.items()}
    assert_resume_keeps_the_hf_model(tmp_path / "o")


def assert_resume_keeps_the_hf_model(out):
    """`train --resume OUT` of an --hf run continues the same HF model (config.json keeps --hf and
    --hf-config; the bit-exact continuation: tests/distributed/test_hf_resume.py), and a resume
    that names another HF model is exit 2 before anything starts."""
    import contextlib
    import io

    from paratrain.cli import build_parser, main
    from paratrain.cli.resume import resume_config

    cfg, _ = resume_config(build_parser().parse_args(["train", "--resume", str(out), "--steps", "5"]))
    assert (cfg.hf, json.loads(cfg.hf_config), cfg.layout.tp) == ("llama", json.loads(LLAMA), 2)
    other = json.dumps({**json.loads(LLAMA), "hidden_size": 64})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--resume", str(out), "--steps", "5", "--hf-config", other]) == 2
    text = " ".join(err.getvalue().split())
    assert "the run trained hf_config = " in text and "Drop that flag" in text and "Traceback" not in text


@pytest.mark.parametrize("config,flags,message", [
    ('{"n_layer": 2, "n_embd": 32, "n_head": 4, "foo": 1}', ["--hf", "gpt2"],
     "--hf-config: foo is not a field of the gpt2 config; valid fields:"),
    ('{"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1}',
     ["--hf", "llama", "--tp", "2"], "tp=2 does not divide the model's key/value heads"),
    ('{"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 100}', ["--hf", "gpt2"],
     "vocab_size 100 is smaller than the data's vocabulary of 256 tokens (the 256 byte tokens)"),
    ('{"n_layer": 2, "n_embd": 32, "n_head": 4}', ["--hf", "gpt2", "--cp", "2", "--seq-len", "32"],
     "a Hugging Face model (--hf gpt2) keeps its own attention"),
])
def test_bad_hf_configs_are_exit_2_before_launch(tmp_path, config, flags, message):
    r = paratrain("train", *flags, "--hf-config", config, "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in " ".join(r.stderr.split())


GPT2 = json.dumps({"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 256, "n_positions": 32})


@pytest.mark.parametrize("config,flags,message", [
    (GPT2, ["--dropout", "0.1"], "--dropout 0.1 sets the built-in GPT's dropout"),
    (GPT2, ["--recompute", "selective"], "Valid with --hf: --recompute full"),
    (GPT2.replace("{", '{"resid_pdrop": 0.1, '), ["--dp", "2"], "Valid: dropout 0"),
    (LLAMA.replace("{", '{"attention_dropout": 0.1, '), ["--tp", "2"], "Valid: dropout 0"),
])
def test_what_hf_models_do_not_do_is_exit_2_naming_what_is_valid(tmp_path, monkeypatch, capsys, config, flags,
                                                                   message):
    from paratrain.cli import main  # in this process: the checks run before anything would start

    monkeypatch.chdir(tmp_path)
    kind = "gpt2" if '"n_layer"' in config else "llama"
    assert main(["train", "--hf", kind, "--hf-config", config, *flags, "--steps", "1", "--seq-len", "16"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err
