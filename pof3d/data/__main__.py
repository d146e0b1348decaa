"""The dataset tool: ``python -m pof3d.data synthetic|convert|inspect|verify``.

Exit codes: 0 success, 2 bad input or usage (one-line message), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from tqdm import tqdm

from pof3d.data.convert import convert
from pof3d.data.shard_reader import iter_rows, read_manifest, verify
from pof3d.data.shards import DEFAULT_SHARD_MB
from pof3d.data.synthetic import generate
from pof3d.errors import Pof3dError

log = logging.getLogger("pof3d.data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pof3d.data", description="Build and check Parquet shard sets."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="render the known-pose synthetic set")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, default=20000, help="number of images (default 20000)")
    s.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--poses", choices=["faces", "cars"], default="faces", help="pose setting (default faces)")
    s.add_argument("--seed", type=int, default=0)
    _common(s)

    c = sub.add_parser("convert", help="convert a folder of images or an EG3D/StyleGAN zip")
    c.add_argument("src", help="folder (searched recursively) or .zip, optionally with dataset.json labels")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--resolution", type=int, default=None, help="centre-crop and resize to this square side")
    c.add_argument("--skip-bad", action="store_true", help="skip bad inputs and count them in the manifest")
    _common(c)

    for name, text in (
        ("inspect", "print the manifest and a few rows"),
        ("verify", "re-read and check every row"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("dir", help="shard directory or URI")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB, help="target shard size (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already in --out")


def _synthetic(args: argparse.Namespace) -> str:
    with tqdm(total=args.n, unit="img", desc="render") as bar:
        out = generate(
            args.out,
            args.n,
            args.resolution,
            args.poses,
            args.seed,
            args.shard_mb,
            args.overwrite,
            bar.update,
        )
    m = read_manifest(str(out))
    shards = len(m["shards"])
    return (
        f"wrote {m['rows']} synthetic {args.poses} images ({args.resolution} px) in {shards} shards to {out}"
    )


def _convert(args: argparse.Namespace) -> str:
    with tqdm(unit="file", desc="convert") as bar:
        out = convert(
            args.src, args.out, args.resolution, args.skip_bad, args.shard_mb, args.overwrite, bar.update
        )
    m = read_manifest(str(out))
    return (
        f"wrote {m['rows']} images ({m['resolution']} px) in {len(m['shards'])} shards to {out};"
        f" skipped {m['skipped']['count']} bad inputs"
    )


def _inspect(args: argparse.Namespace) -> str:
    m = read_manifest(args.dir)
    shown = dict(m, skipped={"count": m["skipped"]["count"], "items": m["skipped"]["items"][:10]})
    print(json.dumps(shown, indent=2))
    for i, row in enumerate(iter_rows(args.dir)):
        if i == 3:
            break
        pose = None if row["pose"] is None else [round(float(x), 4) for x in row["pose"]]
        depth = None if row["depth"] is None else f"{row['depth'].shape} float32"
        print(
            f"row {row['id']}: source={row['source']} image={row['image'].shape} {row['format']}"
            f" pose={pose} label={'25 floats' if row['label'] is not None else None} depth={depth}"
        )
    return f"{args.dir}: {m['rows']} rows in {len(m['shards'])} shards, resolution {m['resolution']}"


def _verify(args: argparse.Namespace) -> str:
    counts = verify(args.dir)
    return (
        f"{args.dir}: verified {counts['rows']} rows in {counts['shards']} shards"
        f" ({counts['skipped']} skipped at write)"
    )


COMMANDS = {"synthetic": _synthetic, "convert": _convert, "inspect": _inspect, "verify": _verify}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = COMMANDS[args.command](args)
    except Pof3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
