"""``python -m imf.convert``: official checkpoints to our export, ours to the official layout, a full official
training state to a DCP checkpoint ``imf.train --resume`` continues from.

::

    python -m imf.convert iMF-B-2.pth --out imf_b2.safetensors            # torch .pth (eval form)
    python -m imf.convert iMF-XL-2.zip --out imf_xl2.safetensors           # JAX inference checkpoint (EMA)
    python -m imf.convert MF-B-4.zip --out mf_b4.safetensors --arch mf     # MeanFlow flax checkpoint
    python -m imf.convert runs/b2/latest --to-official --out ours.pth      # for the official evaluate.py
    python -m imf.convert iMF-B-2-full.zip --dcp runs/ft --config ft.yaml  # fine-tune: imf.train --resume runs/ft

Every failure is one line naming the file and the problem (exit code 2; 3 for a missing optional package).
"""

from __future__ import annotations

from pathlib import Path

from imf.cli import ArgumentParser, require, run_cli
from imf.convert.errors import ConvertError
from imf.convert.official import canonical, from_official, official_arch, to_official
from imf.convert.ours import export_metadata, load_ours, save_official
from imf.convert.readers import read_official

PROG = "python -m imf.convert"


def parser() -> ArgumentParser:
    p = ArgumentParser(error_type=ConvertError, prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "input", metavar="IN", help="official .pth, .zip, flax checkpoint (dir or file); or ours with --to-official"
    )
    p.add_argument("--out", help="output file: .safetensors (our export) or, with --to-official, .pth")
    p.add_argument("--arch", choices=("imf", "mf"), default=None, help="what the weights are (default: by their names)")
    p.add_argument("--preset", default=None, help="the preset the weights must match (default: any size)")
    p.add_argument("--input-size", type=int, default=None, help="latent side (not in the weights; default 32)")
    p.add_argument("--heads", type=int, default=None, help="MF attention heads (not in MF weights; default by width)")
    p.add_argument(
        "--to-official", action="store_true", help="IN is ours (export or checkpoint): write the official .pth"
    )
    p.add_argument(
        "--training-form", action="store_true", help="with --to-official: keep the v-heads (imfDiT eval_mode=False)"
    )
    p.add_argument("--decay", type=float, default=None, help="with --to-official on a DCP checkpoint: which EMA")
    p.add_argument(
        "--dcp",
        metavar="DIR",
        default=None,
        help="full official state -> DCP checkpoint root DIR; the "
        "training config follows as imf.train options (--config FILE, --key value ...)",
    )
    return p


def _import(args) -> str:
    src = read_official(args.input)
    overrides = {k: v for k, v in (("input_size", args.input_size), ("heads", args.heads)) if v is not None}
    sd = canonical(src.weights)
    arch = args.arch or official_arch(sd) or "imf"
    try:
        cfg, weights = from_official(sd, arch=arch, preset=args.preset, **overrides)
    except ConvertError as e:
        raise ConvertError(f"{src.path}: {e}") from None
    from imf.train.export import write_export

    out = write_export(weights, args.out, export_metadata(cfg, source=src.path, fmt=src.format, step=src.step))
    n = sum(v.numel() for v in weights.values()) / 1e6
    what = f"{arch}, {n:.1f}M parameters" + (f", v_head={cfg.v_head}" if arch == "imf" else "")
    return f"wrote {out} ({what}) from {src.path} ({src.format})"


def _export_official(args) -> str:
    if not args.out.endswith((".pth", ".pt")):
        raise ConvertError(f"--out {args.out}: --to-official writes a torch file (.pth)")
    cfg, sd = load_ours(args.input, args.decay)
    official = to_official((cfg, sd), training_form=args.training_form)
    out = save_official(official, Path(args.out))
    form = "training form (imfDiT eval_mode=False)" if args.training_form else "eval form (iMeanFlow)"
    return f"wrote {out}: {len(official)} official keys, {form}, from {args.input}"


def main(argv: list[str]) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.dcp is not None:
        from imf.convert.dcp import write_dcp

        print(write_dcp(args, rest))
        return 0
    if rest:
        raise ConvertError(f"unrecognized arguments: {' '.join(rest)} (see {PROG} --help)")
    if args.out is None:
        raise ConvertError("--out is required (or --dcp DIR)")
    if Path(args.out).is_dir():
        raise ConvertError(f"--out {args.out} is a directory; give a file path")
    if args.to_official:
        print(_export_official(args))
        return 0
    if not args.out.endswith(".safetensors"):
        raise ConvertError(f"--out {args.out}: the export is a .safetensors file")
    require("safetensors", package="safetensors", purpose="imf.convert")
    print(_import(args))
    return 0


def entry(argv: list[str] | None = None) -> int:
    def guarded(a):
        try:
            return main(a)
        except SystemExit as e:  # --help
            return int(e.code or 0)

    return run_cli("imf.convert", guarded, argv)


__all__ = ["entry", "main", "parser"]
