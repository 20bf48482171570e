"""``editsteer weights list|verify|publish``: what the manifest names, where each artifact is, and whether it is intact."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list, verify and publish weight artifacts (weights_manifest/)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="id, status and where each artifact is found")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser("verify", help="check sha256 and size of local copies; exit 1 on any mismatch or absence")
    v.add_argument("ids", nargs="*", metavar="ID", help="artifact ids (default: all that are bundled or found)")
    v.add_argument("--path", help="verify the copy at this file/folder instead of searching (one ID)")
    pub = sub.add_parser("publish", help="upload an artifact to the Hub and pin the manifest to the new revision")
    pub.add_argument("id", metavar="ID")
    pub.add_argument("--repo-id", help="destination repo (default: the manifest's repo_id)")
    pub.add_argument("--path", help="the local copy to upload (default: resolved as usual)")
    pub.add_argument("--private", action="store_true")
    pub.add_argument("--dry-run", action="store_true", help="verify and show the plan; upload nothing")


def _locate(art):
    from ..errors import WeightsError
    from ..weights import resolve

    try:
        found = resolve(art, allow_download=False)
        return found.source, str(found.path), None
    except WeightsError as e:
        return None, None, e


def run(args) -> int:
    from ..weights import load_manifest

    if args.weights_command == "list":
        rows = []
        for art in load_manifest().values():
            source, where, _ = _locate(art)
            rows.append({"id": art.id, "status": art.status, "base_model": art.base_model, "kind": art.kind,
                         "repo_id": art.repo_id, "found": source or "not found", "path": where,
                         "description": art.description})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            w = max([len(r["id"]) for r in rows] + [2])
            print(f"{'ID':<{w}}  {'STATUS':<11}  {'FAMILY':<16}  FOUND")
            for r in rows:
                found = f"{r['found']}: {r['path']}" if r["path"] else r["found"]
                print(f"{r['id']:<{w}}  {r['status']:<11}  {r['base_model']:<16}  {found}")
            if not rows:
                print("(the manifest is empty)")
        return 0

    if args.weights_command == "verify":
        from ..errors import WeightsError
        from ..weights import get_artifact, resolve
        from ..weights.resolver import survey

        arts = [get_artifact(i) for i in args.ids] if args.ids else list(load_manifest().values())
        if args.path and len(arts) != 1:
            print("error: --path needs exactly one ID", file=sys.stderr)
            return 2
        failed = 0
        for art in arts:
            unverifiable = "" if all(f.sha256 for f in art.files) else " (no sha256 in the manifest: unverifiable)"
            if args.path:
                try:
                    found = resolve(art, path=args.path, allow_download=False)
                    print(f"ok    {art.id}: {found.path}{unverifiable}")
                except WeightsError as e:
                    failed += 1
                    print(f"FAIL  {art.id}\n{e}")
                continue
            locs = survey(art)
            good = [loc for loc in locs if loc.outcome == "ok"]
            bad = [loc for loc in locs if loc.outcome != "ok" and not loc.outcome.startswith("missing")]
            for loc in good:
                print(f"ok    {art.id}: {loc.label}: {loc.where}{unverifiable}")
            for loc in bad:
                print(f"FAIL  {art.id}: {loc.label}: {loc.where}: {loc.outcome}")
            if bad:
                failed += 1
            elif not good:
                if args.ids or art.bundled_path:
                    failed += 1
                    print(f"FAIL  {art.id}: no local copy found (searched: " + ", ".join(
                        f"{loc.label} {loc.where}" for loc in locs) + ")")
                else:
                    print(f"skip  {art.id}: no local copy ({art.status})")
        return 1 if failed else 0

    if args.weights_command == "publish":
        from ..weights.publish import publish

        new = publish(args.id, repo_id=args.repo_id, folder=args.path, private=args.private, dry_run=args.dry_run)
        verb = "would publish" if args.dry_run else "published"
        print(f"{verb} {new.id} -> {new.repo_id}" + (f"@{new.revision}" if new.revision else ""))
        for f in new.files:
            print(f"  {f.path}  {f.size} bytes  sha256 {f.sha256}")
        return 0
    return 2
