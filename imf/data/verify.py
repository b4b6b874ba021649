"""``python -m imf.data verify DIR [--no-checksums] [--json]``: check a latent dataset against its manifest.

Exit 0 and a summary when it is sound; otherwise one line on stderr naming the file and what is wrong, and exit
code 2 (no traceback unless ``--debug``; :func:`imf.cli.run_cli`).
"""

from __future__ import annotations

import json

from imf.cli import ArgumentParser, run_cli
from imf.data.format import check_dataset

PROG = "python -m imf.data"


def _verify(argv: list[str]) -> int:
    ap = ArgumentParser(prog=PROG, description="latent dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a latent dataset directory against its manifest")
    v.add_argument("dir")
    v.add_argument("--no-checksums", action="store_true", help="skip sha256 and the full read (fast)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    s = check_dataset(args.dir, checksums=not args.no_checksums, progress=not args.json)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(
        f"OK {s['root']}: {s['count']} samples in {s['shards']} shards, latent {s['latent_shape']} "
        f"{s['dtype']}, {s['num_classes']} classes (per class {s['samples_per_class_min']}.."
        f"{s['samples_per_class_max']}), flipped copies: {s['flipped']}, {s['bytes'] / 2**20:.1f} MiB, "
        f"checksums {'verified' if s['checksums_verified'] else 'not checked'}"
    )
    print("  channel_mean " + " ".join(f"{m:+.4f}" for m in s["channel_mean"]))
    print("  channel_std  " + " ".join(f"{m:.4f}" for m in s["channel_std"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI through :func:`imf.cli.run_cli` (returns the exit code)."""
    return run_cli(f"{PROG} verify", _verify, argv)
