"""`waitlens store verify DIR [DIR ...]`: check activation stores against their manifests.

Every shard's size, tensor shape, fingerprint and sha256, and the metadata's sha256 and row
order. Exit 0 when every store is intact; otherwise one line per store saying what is wrong
(exit 2). A damaged store is repaired by rerunning the capture command with the same --out.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("store", help="check activation stores (store verify DIR)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check every shard's size, shape and sha256, and the metadata",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("stores", nargs="+", metavar="DIR", help="activation store directory")
    v.add_argument("--debug", action="store_true", help="show full tracebacks")
    v.set_defaults(handler=verify)


def verify(args: argparse.Namespace) -> int:
    import sys

    from waitlens.hooks.store import ActivationStore, StoreError

    bad = 0
    for path in args.stores:
        try:
            store = ActivationStore(path)
            n_bytes = store.verify()
        except StoreError as e:
            print(f"waitlens store verify: {e}", file=sys.stderr)
            bad += 1
            continue
        print(f"{store.path}: ok ({len(store.manifest['shards'])} shards, {len(store)} positions, "
              f"{n_bytes / 1e6:.1f} MB checked; {store.model}, {store.manifest.get('compute_dtype', '?')})")
    return 2 if bad else 0
