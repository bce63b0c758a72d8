"""Provision the emoji data set: fetch five pinned npm packages, check them, build the image folder.

    python scripts/provision_emoji.py                       # -> data/emoji (about a minute after the download)
    python scripts/provision_emoji.py --limit 24 --out /tmp/emoji-tiny   # 24 base emoji only
    python -m lidit convert shards data/emoji/train data/emoji/shards-32 --resolution 32 --step 8

Each package comes through `npm pack <name>@<version>` (the npm registry's ordinary client) into
`--cache` (default `.cache/emoji/npm`), is checked against the sha256 pinned below, and only what is
needed is read out of it: nothing is unpacked beside the tarballs. The output folder is described in
`lidit/data/emoji.py` (`write_dataset`); the licences are in docs/emoji.md. Idempotent: a folder
whose `catalog.json` records the same packages and limit is left as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # the pack, and provision_llms beside this script

from provision_llms import sha256_file  # noqa: E402

from lidit.data import emoji as emoji_data  # noqa: E402

#: npm package -> (version, sha256 of the tarball `npm pack` writes)
PACKAGES: dict[str, tuple[str, str]] = {
    "emoji-datasource-google": ("16.0.0", "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "emoji-datasource-twitter": ("16.0.0", "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
    "emojibase-data": ("17.0.0", "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a"),
    "cldr-annotations-full": ("48.2.0", "28576e51225deb51e3ddd734b0f824a0079682cb5d8c27faa9f68149317a14d1"),
    "openmoji": ("17.0.0", "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68"),
}
IMAGE_SIZE = 64  # emoji-datasource's img/<style>/64/


class FetchError(RuntimeError):
    """A package could not be fetched or did not match its pin."""


def log(message: str) -> None:
    print(f"[emoji] {message}", flush=True)


def fetch(name: str, cache: Path) -> Path:
    """The checked tarball of a pinned package, from the cache or through `npm pack`."""
    version, pin = PACKAGES[name]
    tarball = cache / f"{name}-{version}.tgz"
    if tarball.is_file() and sha256_file(tarball) == pin:
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is not on PATH: install Node.js and npm (Debian: apt-get install npm) to fetch {name}")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"npm pack {name}@{version}")
    run = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(cache), "--silent"],
                         capture_output=True, text=True)
    if run.returncode != 0 or not tarball.is_file():
        raise FetchError(f"`npm pack {name}@{version}` failed (exit {run.returncode}): the npm registry could not be "
                         f"reached or the package is gone.\n{run.stderr.strip()[-2000:]}")
    got = sha256_file(tarball)
    if got != pin:
        tarball.unlink()
        raise FetchError(f"{tarball.name}: sha256 {got}, pinned {pin}: the registry served other bytes; "
                         "nothing was kept")
    return tarball


def read_members(tarball: Path, wanted) -> dict[str, bytes]:
    """{name: bytes} of the members for which `wanted(name)` is true (one pass over the gzip stream)."""
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.isfile() and wanted(member.name):
                out[member.name] = tar.extractfile(member).read()
    return out


def spread(keys: list[str], n: int) -> set[str]:
    """n keys evenly spaced over the sorted list: a tiny set still has people, skin tones and flags."""
    if n <= 0:
        raise ValueError(f"--limit must be positive, got {n}")
    return {keys[i * len(keys) // n] for i in range(min(n, len(keys)))}


def build(out: Path, cache: Path, limit: int | None) -> dict:
    t0 = time.perf_counter()
    tarballs = {name: fetch(name, cache) for name in PACKAGES}
    log(f"packages ok (sha256 pinned) in {time.perf_counter() - t0:.1f}s")
    base = read_members(tarballs["emojibase-data"], lambda n: n == "package/en/data.json")
    emojibase = json.loads(base["package/en/data.json"])
    languages = ("en",) + emoji_data.NAME_LANGUAGES
    notes = read_members(tarballs["cldr-annotations-full"],
                         lambda n: n in {f"package/annotations/{lang}/annotations.json" for lang in languages})
    cldr = {lang: json.loads(notes[f"package/annotations/{lang}/annotations.json"])["annotations"]["annotations"]
            for lang in languages}
    openmoji = emoji_data.read_openmoji_csv(
        read_members(tarballs["openmoji"], lambda n: n == "package/data/openmoji.csv")["package/data/openmoji.csv"])
    index = read_members(tarballs["emoji-datasource-google"], lambda n: n == "package/emoji.json")
    emojis = emoji_data.catalogue(json.loads(index["package/emoji.json"]), emojibase)
    # set (b) is drawn from the whole catalogue, before the limit, so a subset keeps the full set's phrasings
    phrasings = emoji_data.phrasings(emojis, emojibase, cldr, openmoji)
    if limit is not None:
        keep = spread(list(dict.fromkeys(e.base for e in emojis)), limit)
        emojis = [e for e in emojis if e.base in keep]
        phrasings = [p for p in phrasings if p.key in keep]
    images: dict[tuple[str, str], bytes] = {}
    for style in emoji_data.STYLES:
        folder = f"package/img/{style}/{IMAGE_SIZE}/"
        names = {f"{folder}{e.key}.png" for e in emojis if style in e.styles}
        found = read_members(tarballs[f"emoji-datasource-{style}"], lambda n, names=names: n in names)
        images |= {(style, Path(n).stem): data for n, data in found.items()}
    log(f"read {len(images)} images in {time.perf_counter() - t0:.1f}s")
    if out.exists():
        shutil.rmtree(out)
    catalog = emoji_data.write_dataset(out, emojis, images, {
        "packages": {name: {"version": v, "sha256": s} for name, (v, s) in PACKAGES.items()},
        "limit": limit, "recipe": recipe(), "phrasings": [vars(p) for p in phrasings]})
    log(f"{out}: {catalog['counts']['train']} training images, {catalog['counts']['real']} real images, held out "
        f"{catalog['counts']['heldout']}, {len(phrasings)} set (b) phrasings, in {time.perf_counter() - t0:.1f}s")
    return catalog


def recipe() -> str:
    """Hash of the code that builds the folder: a folder built by other code is rebuilt."""
    h = hashlib.sha256()
    for path in (Path(__file__), ROOT / "lidit/data/emoji.py"):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def up_to_date(out: Path, limit: int | None) -> bool:
    path = out / "catalog.json"
    if not path.is_file():
        return False
    try:
        catalog = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    want = {name: {"version": v, "sha256": s} for name, (v, s) in PACKAGES.items()}
    same = catalog.get("packages") == want and catalog.get("limit") == limit and catalog.get("recipe") == recipe()
    return same and (out / "train").is_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data/emoji")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache/emoji/npm", help="where the tarballs are kept")
    parser.add_argument("--limit", type=int,
                        help="only N base emoji, evenly spread over the list (and their skin tones), for tests")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    if not args.force and up_to_date(args.out, args.limit):
        log(f"{args.out} is up to date")
        return 0
    try:
        build(args.out, args.cache, args.limit)
    except FetchError as e:
        print(f"[emoji] ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
