"""Bad inputs to the public model API and the ``imf.evaluate`` CLI, and the host syncs of the hot path.

Two tables: ``MODEL_CASES`` + ``GENERATE_CASES`` (every public entry point of the model and
``imf.sample.generate``: a bad argument raises ``ValueError`` naming it) and ``EVAL_CASES``
(``python -m imf.evaluate`` through ``main``: a user error, argparse's own included, exits non-zero with
one line that names the option or file). The sync tests count device-to-host reads on the CPU with
:class:`HostSyncs` (see its docstring): a model call checks its values with one read, a loss with one
read for the whole step, and ``check_values=False`` adds none.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import imf
from imf.config import LossConfig
from imf.evaluate import main
from imf.loss import imf_loss, mf_loss, sample_training_inputs
from imf.sample import generate

aten = torch.ops.aten
MF_TINY = dict(dim=32, heads=2, depth=2, input_size=4, num_classes=5, freq_dim=16)


class HostSyncs(TorchDispatchMode):
    """Counts the operations that read device memory on the host (a sync on CUDA), on any device.

    Counted: ``_local_scalar_dense`` (``item``, ``bool``, ``int``, ``float`` of a tensor), ``nonzero``,
    ``masked_select`` and indexing with a boolean mask (its size needs a ``nonzero``) seen by the dispatcher,
    plus ``Tensor.tolist``, which reads memory without an aten op and is patched for the duration.
    """

    SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
    INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops: list[str] = []
        tolist = torch.Tensor.tolist

        def counted(tensor, *args, **kwargs):
            self.ops.append("tolist")
            return tolist(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNC_OPS:
            self.ops.append(str(func))
        elif func in self.INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.ops.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


def _demo(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return randomize_(imf.build_model("demo"), generator=gen), gen


def _cond(cfg, batch: int, gen):
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = 0.2 + 0.7 * torch.rand(batch, generator=gen)
    return dict(
        z=z,
        t=t,
        r=0.5 * t,
        y=torch.arange(batch) % (cfg.num_classes + 1),
        omega=1 + 3 * torch.rand(batch, generator=gen),
        t_min=torch.full((batch,), 0.1),
        t_max=torch.full((batch,), 0.9),
    )


# ---------------------------------------------------------------------------------------------------------------
# The model API table

BATCH = 3
_ENTRY_POINTS = {
    "forward": lambda m, a: m(a["z"], a["t"], a["r"], a["y"], a["omega"], a["t_min"], a["t_max"]),
    "velocity": lambda m, a: m.velocity(a["z"], a["t"], a["r"], a["y"], a["omega"], a["t_min"], a["t_max"]),
    "forward_with_tangent": lambda m, a: m.forward_with_tangent(
        a["z"], a.get("z_t", a["z"]), a["t"], a["r"], a["y"], a["omega"], a["t_min"], a["t_max"]
    ),
}

# (case name, replacements of the good arguments, regex the ValueError must match)
_CONDITION_CASES = [
    ("label 11", lambda a: {"y": torch.tensor([0, 11, 2])}, r"y \(class labels\) must be in \[0, 10\].*got y=11"),
    ("label -1", lambda a: {"y": torch.tensor([-1, 1, 2])}, r"y \(class labels\) must be in .*got y=-1"),
    ("float labels", lambda a: {"y": a["y"].float()}, r"y must have an integer"),
    ("bool labels", lambda a: {"y": a["y"] > 0}, r"y must have an integer"),
    ("labels of another batch", lambda a: {"y": a["y"][:2]}, r"y must be a tensor of shape \(3,\)"),
    ("labels as a list", lambda a: {"y": [0, 1, 2]}, r"y must be a tensor of shape \(3,\), got list"),
    ("z None", lambda a: {"z": None}, r"z must be a tensor of shape \(batch, 1, 8, 8\), got NoneType"),
    ("z of the wrong size", lambda a: {"z": a["z"][:, :, :4]}, r"z must be a tensor of shape"),
    ("integer z", lambda a: {"z": a["z"].long()}, r"z must be a floating tensor"),
    ("t > 1", lambda a: {"t": a["t"] + 1.0}, r"t must be in \[0, 1\], got t=1\.\d+ at sample 0"),
    ("t < 0", lambda a: {"t": a["t"] - 2.0, "r": a["t"] - 2.0}, r"t must be in \[0, 1\]"),
    ("t NaN", lambda a: {"t": a["t"] * float("nan")}, r"t must be in \[0, 1\]"),
    ("integer t", lambda a: {"t": (a["t"] * 0).long()}, r"t must have a floating dtype"),
    ("r > t", lambda a: {"r": a["t"] + 0.05}, r"r must satisfy 0 <= r <= t, got r=.*, t="),
    ("r < 0", lambda a: {"r": a["r"] - 1.0}, r"r must satisfy 0 <= r <= t"),
    ("omega < 1", lambda a: {"omega": a["omega"] * 0 + 0.5}, r"omega must be >= 1.*got omega=0\.5"),
    ("omega None", lambda a: {"omega": None}, r"omega must be a tensor of shape \(3,\), got NoneType"),
    ("t_min > t_max", lambda a: {"t_min": a["t_max"] + 0.05}, r"t_min, t_max must satisfy 0 <= t_min <= t_max"),
    ("t_max > 1", lambda a: {"t_max": a["t_max"] + 0.5}, r"t_min, t_max must satisfy .*t_max=1\.4"),
    ("t_min < 0", lambda a: {"t_min": a["t_min"] - 0.5}, r"t_min, t_max must satisfy .*t_min=-0\.4"),
    ("t_max of another batch", lambda a: {"t_max": a["t_max"][:1]}, r"t_max must be a tensor of shape \(3,\)"),
]
_TANGENT_CASES = [
    ("z_t None", lambda a: {"z_t": None}, r"z_t must be a tensor of shape \(n <= 3, 1, 8, 8\), got NoneType"),
    ("z_t longer than z", lambda a: {"z_t": torch.cat([a["z"], a["z"]])}, r"z_t must be a tensor of shape"),
    ("z_t of another dtype", lambda a: {"z_t": a["z"].double()}, r"z_t must match z in dtype"),
]
MODEL_CASES = [(entry, *case) for entry in _ENTRY_POINTS for case in _CONDITION_CASES] + [
    ("forward_with_tangent", *case) for case in _TANGENT_CASES
]

# imf.sample.generate(model, y, omega, t_min, t_max, steps, noise=...)
GENERATE_CASES = [
    ("label 11", dict(y=torch.tensor([0, 11])), r"y \(class labels\) must be in \[0, 10\].*got y=11"),
    ("label -1", dict(y=torch.tensor([-1, 0])), r"y \(class labels\) must be in"),
    ("float labels", dict(y=torch.tensor([0.0, 1.0])), r"y must be a 1-D tensor of integer class labels"),
    ("labels as a list", dict(y=[0, 1]), r"y must be a 1-D tensor of integer class labels, got list"),
    ("omega < 1", dict(omega=0.5), r"omega must be >= 1"),
    ("omega NaN", dict(omega=float("nan")), r"omega must be >= 1"),
    ("omega as a string", dict(omega="8"), r"omega must be a float or a tensor"),
    ("omega of another batch", dict(omega=torch.ones(3)), r"omega must be a float or a tensor of shape \(2,\)"),
    ("t_min > t_max", dict(t_min=0.7, t_max=0.3), r"t_min, t_max must satisfy 0 <= t_min <= t_max <= 1"),
    ("t_max > 1", dict(t_max=1.5), r"t_min, t_max must satisfy"),
    ("steps 0", dict(steps=0), r"steps must be an integer >= 1, got 0"),
    ("steps 1.5", dict(steps=1.5), r"steps must be an integer >= 1, got 1\.5"),
    (
        "noise of the wrong shape",
        dict(noise=torch.zeros(2, 1, 4, 4)),
        r"noise must be a tensor of shape \(2, 1, 8, 8\)",
    ),
]


@pytest.mark.parametrize("entry,case,bad,match", MODEL_CASES, ids=[f"{c[0]}: {c[1]}" for c in MODEL_CASES])
def test_model_rejects_bad_input(entry, case, bad, match):
    model, gen = _demo()
    args = _cond(model.cfg, BATCH, gen)
    with pytest.raises(ValueError, match=match):
        _ENTRY_POINTS[entry](model, {**args, **bad(args)})


@pytest.mark.parametrize("case,bad,match", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_rejects_bad_input(case, bad, match):
    model, _ = _demo()
    kw = {"y": torch.tensor([0, 10]), **bad}
    with pytest.raises(ValueError, match=match):
        generate(model, **kw)


def test_good_inputs_pass_and_mf_ignores_guidance():
    """The table's good arguments are accepted (the null label 10 included); the MF DiT checks labels and
    times but not omega / the interval, which it ignores."""
    model, gen = _demo()
    args = _cond(model.cfg, BATCH, gen)
    for call in _ENTRY_POINTS.values():
        call(model, args)
    assert generate(model, torch.tensor([0, 10]), omega=2.0, t_min=0.2, t_max=0.8, steps=2).shape == (2, 1, 8, 8)
    mf = imf.build_model("MF-B/2", **MF_TINY)
    a = _cond(mf.cfg, BATCH, gen)
    mf(a["z"], a["t"], a["r"], a["y"])
    with pytest.raises(ValueError, match=r"y \(class labels\) must be in \[0, 5\]"):
        mf(a["z"], a["t"], a["r"], a["y"] + 6)
    with pytest.raises(ValueError, match="r must satisfy"):
        mf.forward_with_tangent(a["z"], a["z"], a["t"], a["t"] + 0.05, a["y"])


# ---------------------------------------------------------------------------------------------------------------
# Host syncs


def test_model_calls_check_with_one_sync_and_none_when_told(monkeypatch):
    model, gen = _demo()
    a = _cond(model.cfg, BATCH, gen)
    for call in _ENTRY_POINTS.values():
        with HostSyncs(monkeypatch) as syncs:
            call(model, a)
        assert syncs.ops == ["tolist"]
    positional = (a["z"], a["t"], a["r"], a["y"], a["omega"], a["t_min"], a["t_max"])
    with HostSyncs(monkeypatch) as syncs:
        model(*positional, check_values=False)
        model.velocity(*positional, check_values=False)
        model.forward_with_tangent(a["z"], a["z"][:2], *positional[1:], with_velocity=True, check_values=False)
    assert syncs.ops == []


def test_training_step_reads_the_device_once(monkeypatch):
    """imf_loss (scattered r = t samples, so it reorders; guidance on) and mf_loss with guidance: one host read
    for the loss, none in backward."""
    model, gen = _demo()
    x = torch.randn(12, 1, 8, 8, generator=gen)
    e = torch.randn(x.shape, generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    t, r, omega, t_min, t_max, drop = sample_training_inputs(12, LossConfig(class_drop=0.3), gen)
    perm = torch.randperm(12, generator=gen)
    args = [v[perm] for v in (x, y, e, t, r, omega, t_min, t_max, drop)]
    with HostSyncs(monkeypatch) as syncs:
        loss, metrics = imf_loss(model, *args)
    assert syncs.ops == ["tolist"] and 0 < metrics["n_tangent"] < 12
    with HostSyncs(monkeypatch) as syncs:
        loss.backward()
    assert syncs.ops == []
    mf = randomize_(imf.build_model("MF-B/2", **MF_TINY), generator=gen)
    cfg = LossConfig.for_method("mf", omega=2.0, kappa=0.2, t_start=0.1, t_end=0.9, class_drop=0.3)
    t, r, *_, drop = sample_training_inputs(12, cfg, gen)
    x4, e4 = x[:, :, :4, :4].repeat(1, 4, 1, 1), e[:, :, :4, :4].repeat(1, 4, 1, 1)
    with HostSyncs(monkeypatch) as syncs:
        mf_loss(mf, x4, y % 5, e4, t[perm], r[perm], drop=drop[perm], cfg=cfg)[0].backward()
    assert syncs.ops == ["tolist"]


def test_generate_reads_the_device_once(monkeypatch):
    model, _ = _demo()
    with HostSyncs(monkeypatch) as syncs:
        generate(model, torch.tensor([0, 3, 10]), omega=2.0, t_min=0.2, t_max=0.8, steps=2)
    assert syncs.ops == ["tolist"]


def test_sync_counter_sees_hidden_syncs(monkeypatch):
    """The counter is not blind: a boolean-mask index, .item() and bool() are counted."""
    x = torch.randn(5)
    with HostSyncs(monkeypatch) as syncs:
        _ = x[x > 0]
        x.sum().item()
        bool(x.sum() > 0)
    assert len(syncs.ops) == 3


# ---------------------------------------------------------------------------------------------------------------
# The imf.evaluate CLI table


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny digits-shaped export (random weights, decay 0.9) in the format of ``python -m imf.train export``."""
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    model = imf.build_model("demo", dim=16, heads=2)
    meta = {
        "format": "pt",
        "imf.model_config": json.dumps(dataclasses.asdict(model.cfg)),
        "imf.preset": "demo",
        "imf.ema_decay": "0.9",
        "imf.step": "3",
        "imf.train_config": json.dumps({"data": {"source": "digits"}}),
    }
    good = root / "model.safetensors"
    save_file(model.state_dict(), str(good), metadata=meta)
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "header.safetensors").write_bytes(data[:5])
    save_file(model.state_dict(), str(root / "nometa.safetensors"))
    wrong = {**meta, "imf.model_config": json.dumps(dataclasses.asdict(dataclasses.replace(model.cfg, dim=24)))}
    save_file(model.state_dict(), str(root / "wrong_config.safetensors"), metadata=wrong)
    (root / "model.pt").write_bytes(b"x")
    (root / "afile").write_text("x")
    (root / "run").mkdir()
    (root / "ckpts").mkdir()
    (root / "ckpts" / "latest").write_text("step_000000099\n")
    return root


# (case, argv after --ckpt <file>, the exit code, text the one error line must contain). ``{root}`` is the
# fixture folder; "-" as the ckpt name means no --ckpt at all.
EVAL_CASES = [
    ("no --ckpt", "-", [], 2, "--ckpt"),
    ("missing file", "nope.safetensors", [], 2, "nope.safetensors does not exist"),
    ("truncated safetensors", "truncated.safetensors", [], 2, "truncated.safetensors is not a readable safetensors"),
    ("5-byte safetensors", "header.safetensors", [], 2, "header.safetensors is not a readable safetensors"),
    ("safetensors without metadata", "nometa.safetensors", [], 2, "has no imf.model_config metadata"),
    ("weights of another config", "wrong_config.safetensors", [], 2, "do not match its model config"),
    ("not a safetensors file", "model.pt", [], 2, "expected the trainer's EMA export"),
    ("a run directory", "run", [], 2, "is not a checkpoint: no meta.json"),
    ("latest names a missing step", "ckpts/latest", [], 2, "names 'step_000000099', which is missing"),
    ("checkpoint root, dangling latest", "ckpts", [], 2, "names 'step_000000099', which is missing"),
    ("--num -1", "model.safetensors", ["--num", "-1"], 2, "--num -1 must be a positive multiple of 10"),
    ("--num 0", "model.safetensors", ["--num", "0"], 2, "e.g. --num 10"),
    ("--num 15", "model.safetensors", ["--num", "15"], 2, "e.g. --num 10 or --num 20"),
    ("--num abc", "model.safetensors", ["--num", "abc"], 2, "--num/--num-samples: invalid int value"),
    ("--steps 0", "model.safetensors", ["--steps", "0"], 2, "--steps values must be >= 1"),
    ("--steps x", "model.safetensors", ["--steps", "1,x"], 2, "--steps must be comma-separated integers"),
    ("--omega 0.5", "model.safetensors", ["--omega", "2,0.5"], 2, "--omega values must be >= 1"),
    ("--omega nan", "model.safetensors", ["--omega", "nan"], 2, "--omega must be finite"),
    ("--interval reversed", "model.safetensors", ["--interval", "0.7:0.3"], 2, "need 0 <= t_min <= t_max <= 1"),
    ("--interval one number", "model.safetensors", ["--interval", "0.4"], 2, "--interval entries are t_min:t_max"),
    ("--interval past 1", "model.safetensors", ["--interval", "0:1.5"], 2, "need 0 <= t_min <= t_max <= 1"),
    ("--batch 0", "model.safetensors", ["--batch", "0"], 2, "--batch must be a positive integer, got 0"),
    ("--vae-batch -1", "model.safetensors", ["--vae-batch", "-1"], 2, "--vae-batch must be a positive integer"),
    ("unknown --preset", "model.safetensors", ["--preset", "iMF-XXL/2"], 2, "unknown --preset 'iMF-XXL/2'"),
    ("wrong --preset", "model.safetensors", ["--preset", "iMF-B/2"], 2, "is a 'demo' model, not --preset"),
    ("--decay not in file", "model.safetensors", ["--decay", "0.5"], 2, "--decay 0.5"),
    ("--device tpu", "model.safetensors", ["--device", "tpu"], 2, "--device must be 'auto', 'cpu' or 'cuda[:i]'"),
    ("--device cuda without CUDA", "model.safetensors", ["--device", "cuda"], 2, "CUDA is not available"),
    ("--out is a file", "model.safetensors", ["--out", "{root}/afile"], 2, "is a file, not a directory"),
    ("--out under a file", "model.safetensors", ["--out", "{root}/afile/eval"], 2, "afile' is a file, not a"),
    ("--backend triton on CPU", "model.safetensors", ["--backend", "triton"], 2, "needs TRITON_INTERPRET=1"),
    ("--metrics bogus", "model.safetensors", ["--metrics", "fid"], 2, "--metrics: invalid choice"),
    ("--vae for pixel digits", "model.safetensors", ["--vae", "{root}"], 2, "the digits demo is in pixel space"),
    (
        "inception on the pixel-space digits model",
        "model.safetensors",
        ["--metrics", "inception"],
        2,
        "this checkpoint is the pixel-space digits model (1x8x8, 10 classes): use --metrics digits",
    ),
]


@pytest.mark.parametrize("case,ckpt,extra,code,text", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_evaluate_cli_rejects_bad_input(export, tmp_path, capsys, monkeypatch, case, ckpt, extra, code, text):
    if case == "--device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("IMF_DEBUG", raising=False)
    root = str(export)
    argv = [] if ckpt == "-" else ["--ckpt", f"{root}/{ckpt}"]
    argv += ["--num", "20", "--out", str(tmp_path / "out"), "--no-progress"]  # the case's options come last and win
    argv += [a.format(root=root) for a in extra]
    got = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert len(err) == 1, err  # exactly one line, no traceback
    assert err[0].startswith("imf.evaluate: error: ") and text.format(root=root) in err[0], err


def test_missing_torch_fidelity_is_a_missing_dependency(monkeypatch):
    """Without torch-fidelity the Inception scorer stops with the install command (exit code 3 via run_cli)."""
    from imf.cli import MissingDependencyError
    from imf.evaluate.scorers import require_fidelity

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` fail
    with pytest.raises(MissingDependencyError, match=r'needs torch-fidelity.*pip install -e "\.\[eval\]"') as e:
        require_fidelity()
    assert e.value.exit_code == 3
