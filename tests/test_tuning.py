"""The reproducible autotune choice of ``imf_kernels._tuning``: config cache round trip, pinned mode
without timing, clear errors for bad cache files. CPU only (Triton interpreter)."""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl
from imf_kernels import _tuning


@triton.jit
def _scale_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2.0, mask=offs < n)


CANDIDATES = [triton.Config({"BLOCK": b}, num_warps=w) for b in (16, 32, 64) for w in (1, 2)]


def _tuner(pinned=None, prune=None):
    """A fresh Tuner (empty per-key cache) over the tiny kernel; timing it would need a GPU."""
    tuner = _tuning.Tuner(
        _scale_kernel, name="test._scale_kernel", candidates=CANDIDATES, key=["n"], prune=prune, pinned=pinned
    )

    def no_timing(*args, **kwargs):
        raise AssertionError("the autotuner timed configs")

    tuner._bench = no_timing
    return tuner


def _launch(tuner, n=37):
    x = torch.arange(n, dtype=torch.float32)
    y = torch.empty_like(x)
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    torch.testing.assert_close(y, 2 * x)  # the chosen config really ran
    return tuner.best_config


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    monkeypatch.setattr(_tuning, "_choices", {})
    monkeypatch.setattr(_tuning, "_loaded", {})
    monkeypatch.delenv(_tuning.CACHE_ENV, raising=False)
    monkeypatch.delenv(_tuning.PINNED_ENV, raising=False)


def test_pinned_mode_default_rule_is_first_surviving_candidate(monkeypatch):
    monkeypatch.setenv(_tuning.PINNED_ENV, "1")
    drop_16 = lambda configs, meta: [c for c in configs if c.kwargs["BLOCK"] != 16]
    chosen = _launch(_tuner(prune=drop_16))
    assert chosen == CANDIDATES[2]


def test_pinned_mode_uses_declared_config_and_function(monkeypatch):
    monkeypatch.setenv(_tuning.PINNED_ENV, "1")
    assert _launch(_tuner(pinned=CANDIDATES[5])) == CANDIDATES[5]
    by_n = lambda meta: CANDIDATES[1] if meta["n"] < 100 else CANDIDATES[4]
    assert _launch(_tuner(pinned=by_n), n=37) == CANDIDATES[1]
    assert _launch(_tuner(pinned=by_n), n=300) == CANDIDATES[4]


def test_without_pinned_mode_or_cache_it_times(monkeypatch):
    with pytest.raises(AssertionError, match="timed configs"):
        _launch(_tuner())


def test_cache_round_trip_replays_the_choice_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv(_tuning.PINNED_ENV, "1")
    chosen = _launch(_tuner(pinned=CANDIDATES[3]))
    path = tmp_path / "configs.json"
    assert _tuning.save_cache(path) == 1
    doc = json.loads(path.read_text())
    assert doc["kernels"]["test._scale_kernel"] == {"37|torch.float32|torch.float32": _tuning.config_to_json(chosen)}

    monkeypatch.setattr(_tuning, "_choices", {})
    monkeypatch.delenv(_tuning.PINNED_ENV)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    assert _launch(_tuner()) == CANDIDATES[3]  # from the file, not the default rule, not timed
    assert _tuning.choices() == doc["kernels"]
    with pytest.raises(AssertionError, match="timed configs"):  # a key the file does not hold is tuned
        _launch(_tuner(), n=64)


def test_load_cache_api(tmp_path):
    path = tmp_path / "c.json"
    entry = _tuning.config_to_json(CANDIDATES[4])
    path.write_text(
        json.dumps(
            {
                "format": _tuning.CACHE_FORMAT,
                "kernels": {"test._scale_kernel": {"37|torch.float32|torch.float32": entry}},
            }
        )
    )
    assert _tuning.load_cache(path) == 1
    assert _launch(_tuner()) == CANDIDATES[4]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read the config cache"),
        ("{not json", "cannot read the config cache"),
        ('{"kernels": {}}', "not a config cache"),
        ('{"format": "imf_kernels-configs/1", "kernels": {"k": {"1": {"num_warps": 4}}}}', "not a config cache"),
    ],
)
def test_bad_cache_file_names_the_path(monkeypatch, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    with pytest.raises(ValueError, match=f"IMF_KERNELS_CONFIGS={path}: {message}"):
        _launch(_tuner())


def test_cache_entry_not_a_candidate_is_an_error(monkeypatch, tmp_path):
    path = tmp_path / "stale.json"
    stale = {"kwargs": {"BLOCK": 128}, "num_warps": 4, "num_stages": 3}
    path.write_text(
        json.dumps(
            {
                "format": _tuning.CACHE_FORMAT,
                "kernels": {"test._scale_kernel": {"37|torch.float32|torch.float32": stale}},
            }
        )
    )
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    with pytest.raises(
        ValueError,
        match=r"stale\.json: kernel test\._scale_kernel, key 37\|torch.float32\|torch"
        r"\.float32: .* is not one of its 6 candidate configs",
    ):
        _launch(_tuner())


def test_autotune_keeps_single_interpret_config_and_checks_arguments(monkeypatch):
    tuner = _tuning.autotune(candidates=CANDIDATES, key=["n"], interpret_config=CANDIDATES[0])(_scale_kernel)
    assert tuner.configs == [CANDIDATES[0]]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU: the real tuner and its argument checks
    with pytest.raises(ValueError, match="pinned config"):
        _tuning.autotune(candidates=CANDIDATES[:2], key=["n"], interpret_config=CANDIDATES[0], pinned=CANDIDATES[3])
    with pytest.raises(ValueError, match="smem_bytes and tensor_arg"):
        _tuning.autotune(candidates=CANDIDATES, key=["n"], interpret_config=CANDIDATES[0], tensor_arg="X")
    tuner = _tuning.autotune(candidates=CANDIDATES, key=["n"], interpret_config=CANDIDATES[0])(_scale_kernel)
    assert isinstance(tuner, _tuning.Tuner) and tuner.name == "test_tuning._scale_kernel"
