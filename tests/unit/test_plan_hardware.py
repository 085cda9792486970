"""The device catalog, explicit figures and calibrated profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paratrain.errors import ConfigError
from paratrain.plan.hardware import (
    CATALOG,
    PROFILE_VERSION,
    GiB,
    Hardware,
    custom_hardware,
    get_hardware,
    load_profile,
    save_profile,
)


def test_catalog_has_the_issue_devices_with_sources() -> None:
    assert {"H100-80GB", "A100-80GB", "A100-40GB", "V100-32GB", "cpu"} <= set(CATALOG)
    for hw in CATALOG.values():
        assert hw.source and hw.peak_fp16_flops >= hw.peak_fp32_flops > 0
        assert hw.intra_node_bw >= hw.inter_node_bw > 0


def test_datasheet_figures() -> None:
    h100, a100 = CATALOG["H100-80GB"], CATALOG["A100-40GB"]
    assert h100.peak_flops("bf16") == 989e12 and h100.memory_bytes == 80 * GiB and h100.intra_node_bw == 450e9
    assert a100.peak_flops("fp32") == 19.5e12 and a100.memory_bw == 1.555e12
    v100 = CATALOG["V100-32GB"]
    assert v100.peak_bf16_flops == 0 and v100.peak_flops("bf16") == 125e12  # no bf16 units: fp16 peak


def test_lookup() -> None:
    assert get_hardware("h100-80gb") is CATALOG["H100-80GB"]
    with pytest.raises(ConfigError, match="H100-80GB"):
        get_hardware("TPU")


def test_explicit_figures() -> None:
    hw = custom_hardware(CATALOG["A100-80GB"], memory_bytes=40 * GiB, inter_node_bw=None)
    assert hw.memory_bytes == 40 * GiB and hw.inter_node_bw == CATALOG["A100-80GB"].inter_node_bw
    assert hw.name == "A100-80GB*"
    bare = custom_hardware(None, peak_fp32_flops=1e12, memory_bytes=GiB, intra_node_bw=1e9)
    assert bare.inter_node_bw == 1e9 and bare.devices_per_node == 8 and bare.peak_flops("bf16") == 1e12
    with pytest.raises(ConfigError, match="--intra-bw-gbs"):
        custom_hardware(None, peak_fp32_flops=1e12, memory_bytes=GiB)
    with pytest.raises(ConfigError, match="compute_efficiency"):
        CATALOG["cpu"].replace(compute_efficiency=1.5)
    with pytest.raises(ConfigError, match="memory_bytes"):
        CATALOG["cpu"].replace(memory_bytes=-1)


def test_profile_round_trip(tmp_path: Path) -> None:
    hw = CATALOG["cpu"].replace(name="profile:test", peak_fp32_flops=5e10)
    path = save_profile(tmp_path / "sub" / "p.json", hw, {"note": 1})
    assert load_profile(path) == hw
    assert get_hardware(f"profile:{path}") == hw


def test_bad_profiles(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        load_profile(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a paratrain device profile"):
        load_profile(bad)
    doc = {"format": "paratrain-device-profile", "version": PROFILE_VERSION, "hardware": {"name": "x"}}
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="missing key"):
        load_profile(bad)
    doc["version"] = 99
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="version"):
        load_profile(bad)
    assert isinstance(Hardware.from_dict(CATALOG["cpu"].to_dict()), Hardware)


def test_fit_layer_work_recovers_the_figures_that_made_the_points() -> None:
    """calibrate's least-squares fit of t = FLOPs / rate + lambda A + c L: points made from
    known figures (the shapes calibrate measures) give those figures back; a term the points do
    not support (made with a negative lambda, which no machine has) is dropped and the rest
    refitted, never returned negative. Catches a wrong column, weighting or elimination."""
    from paratrain.calibrate import fit_layer_work

    shapes = [(8.3e8, 8.8e6, 8), (3.3e9, 3.5e7, 8), (1.46e9, 8.9e6, 4), (5.8e9, 3.6e7, 4), (7.95e9, 2.6e7, 6),
              (1.59e10, 5.2e7, 6), (4.05e10, 6.8e7, 8)]

    def points(rate: float, lam: float, c: float) -> list[dict[str, float]]:
        return [{"flops": F, "activation_bytes": A, "layers": L, "seconds": F / rate + lam * A + c * L}
                for F, A, L in shapes]

    got = fit_layer_work(points(55e9, 1.8e-9, 1.8e-3))
    assert got == pytest.approx((55e9, 1.8e-9, 1.8e-3), rel=1e-6)
    assert fit_layer_work(points(80e9, 0.0, 2e-3)) == pytest.approx((80e9, 0.0, 2e-3), rel=1e-6, abs=1e-15)
    rate, lam, c = fit_layer_work(points(60e9, -1e-9, 3e-3))
    assert lam == 0.0 and rate > 0 and c >= 0


def test_a_version_2_profile_still_loads_without_the_per_layer_term(tmp_path: Path) -> None:
    """Profiles written before the per-layer term (version 2) load with it at 0: the model they
    were calibrated for."""
    hw = CATALOG["cpu"]
    doc = {"format": "paratrain-device-profile", "version": 2,
           "hardware": {k: v for k, v in hw.to_dict().items() if k != "layer_overhead_s"}}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(doc))
    assert load_profile(path) == hw.replace(layer_overhead_s=0.0)


def test_link_fit_is_relative() -> None:
    """``calibrate.fit_link``: exact points give back the link; and the fit weighs every size by
    its relative error, so a 16 MiB point 15% above the line does not drag the small sizes (the
    ones tensor parallelism sends) with it: within 8% at every size (measured 7.4%, at 16 MiB).
    A plain least-squares fit follows the largest point and misses 1 KiB and 16 KiB by -16% and
    4 MiB by +10% on these points (the check fails with it)."""
    from paratrain.calibrate import fit_link

    sizes = (1024, 16384, 262144, 1048576, 4194304, 16777216)
    bw, alpha = 1.2e9, 4e-4
    exact = [2 * alpha + s / bw for s in sizes]
    got_bw, got_alpha = fit_link(sizes, exact, steps=2)
    assert got_bw == pytest.approx(bw, rel=1e-9) and got_alpha == pytest.approx(alpha, rel=1e-9)
    noisy = exact[:-1] + [exact[-1] * 1.15]
    fb, fa = fit_link(sizes, noisy, steps=2)
    worst = max(abs((2 * fa + s / fb) / t - 1) for s, t in zip(sizes, noisy))
    assert worst < 0.08, worst
