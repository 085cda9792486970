"""Corpus and batches: the global batch depends only on (seed, step); dp ranks slice it."""

import numpy as np
import pytest

from paratrain.data import VAL, check_corpus, decode, dp_rows, encode, get_batch, load_corpus
from paratrain.errors import ConfigError


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_default_corpus_is_the_stdlib(corpus):
    assert corpus.num_files > 500
    assert len(corpus.train) > 10_000_000 and len(corpus.val) > 100_000
    assert b"def " in corpus.train[:200_000].tobytes()
    assert corpus.train.dtype == np.uint8


def test_batch_depends_only_on_seed_and_step(corpus):
    x1, y1 = get_batch(corpus.train, 32, 8, seed=0, step=3)
    x2, y2 = get_batch(corpus.train, 32, 8, seed=0, step=3)
    x3, _ = get_batch(corpus.train, 32, 8, seed=0, step=4)
    x4, _ = get_batch(corpus.train, 32, 8, seed=1, step=3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3) and not np.array_equal(x1, x4)
    assert np.array_equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one


def test_dp_slices_concatenate_to_the_global_batch(corpus):
    full, _ = get_batch(corpus.train, 16, 8, seed=0, step=1)
    for dp in (1, 2, 4, 8):
        parts = [get_batch(corpus.train, 16, 8, 0, 1, dp_rows(8, dp, r))[0] for r in range(dp)]
        assert np.array_equal(np.concatenate(parts), full)


def test_validation_stream_differs(corpus):
    a, _ = get_batch(corpus.val, 32, 4, 0, 0, split=VAL)
    b, _ = get_batch(corpus.train, 32, 4, 0, 0)
    assert not np.array_equal(a, b)


def test_user_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 200)
    c = load_corpus(str(f))
    assert len(c.train) > 0 and len(c.val) > 0
    check_corpus(c, 32)
    with pytest.raises(ConfigError, match="too few"):
        check_corpus(c, 10_000)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="holds no text files"):
        load_corpus(str(tmp_path / "d"))


def test_encode_decode_roundtrip():
    assert decode(encode("π = 3.14\n")) == "π = 3.14\n"


def test_decode_ids_beyond_a_byte():
    """A model with a vocabulary above 256 (tiny-odd) can sample id 256: shown as U+FFFD."""
    assert decode([104, 256, 105]) == "h\ufffdi"


def _names_by_split() -> dict[bool, str]:
    """One file name that the per-file CRC choice sends to validation, and one it keeps for training."""
    import zlib

    from paratrain.data import VAL_EVERY

    found: dict[bool, str] = {}
    for i in range(200):
        name = f"corpus{i}.txt"
        found.setdefault(zlib.crc32(name.encode()) % VAL_EVERY == 0, name)
    return found


@pytest.mark.parametrize("held_out", [True, False])
def test_a_single_file_trains_whatever_its_name(tmp_path, held_out):
    """Issue 15 item 9: the same bytes under a name that hashes to the validation side used to
    leave 0 training tokens."""
    text = b"def f(x):\n    return x + 1\n" * 400
    name = _names_by_split()[held_out]
    (tmp_path / name).write_bytes(text)
    c = load_corpus(str(tmp_path / name))
    check_corpus(c, 128)
    assert c.train.tobytes() + c.val.tobytes() == text
    assert len(c.val) == len(text) - int(len(text) * 0.9)
    assert load_corpus(str(tmp_path / name)).train.tobytes() == c.train.tobytes()  # deterministic


def test_a_folder_of_few_files_is_split_inside_the_text(tmp_path):
    files = {f"m{i}.py": (f"# module {i}\n" + "x = 1\n" * 300).encode() for i in range(5)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    c = load_corpus(str(tmp_path))
    whole = b"".join(files[n] for n in sorted(files))
    assert c.train.tobytes() + c.val.tobytes() == whole and c.num_files == 5
    assert 0.05 < len(c.val) / len(whole) < 0.15 and not c.warnings


def test_a_binary_file_warns(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" * 500)
    c = load_corpus(str(tmp_path / "blob.bin"))
    assert len(c.warnings) == 1 and "binary" in c.warnings[0] and "blob.bin" in c.warnings[0]
