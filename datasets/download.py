"""Fetch the anomaly-detection benchmarks whose owners publish one direct archive.

``ensure_downloaded(dataset, root)`` makes ``root`` (the config's ``data.root``) hold the
dataset in the layout the loaders read (see ``datasets/layouts.py``), downloading,
verifying and safely extracting the official archive when it is missing.

Direct archives (``DOWNLOADS``): MVTec AD, VisA, BTAD, MVTec 3D-AD, MVTec LOCO AD and MVTec AD 2. The URLs and
checksums are the ones anomalib ships in its datamodules (openvinotoolkit/anomalib,
``src/anomalib/data/datamodules/{image,depth}/*.py``, ``DownloadInfo``); MVTec 3D-AD only
has a public md5. MPDD and Eyecandies are published as cloud-drive folders (OneDrive,
Google Drive) without a stable direct link: for them, and as the fallback for every
dataset, ``MANUAL_STEPS`` says what to do by hand.

Everything we write goes under ``root``: the partial download and the verified archive
in ``root/.download/``, the extraction in a temporary folder inside it (moved into place
only once complete), and last the completion marker ``root/.download/<dataset>.complete``.
Extraction refuses, on every Python: members whose path or link target (resolved through the
links extracted before and after it) leaves that folder, special files, and archives that
unpack to far more bytes or members than a dataset would (see ``_MAX_EXPANSION``).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from datasets.categories import (BTAD_CATEGORIES, MVTEC3D_CATEGORIES, MVTEC_AD2_CATEGORIES, MVTEC_CATEGORIES,
                                 MVTEC_LOCO_CATEGORIES, VISA_CATEGORIES)
from utils.errors import UserError
from utils.locks import FileLock

_TIMEOUT_S = 60.0  # per socket operation; a stalled server counts as an interruption
_ATTEMPTS = 3  # tries per URL when the connection drops; each one resumes the partial file
_CHUNK = 1 << 20
_DOWNLOAD_DIR = ".download"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
# The stdlib 'data' filter (Python >= 3.10.12 / 3.11.4) re-checks paths, links and file types on
# top of our own checks (_ExtractedTree), which alone protect older interpreters.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
# What one archive may unpack to. Dataset archives hold PNG/JPEG images, which barely compress
# again, so a far larger expansion, or a flood of members, is a wrong or hostile archive (a "bomb").
# The margins are wide (MVTec 3D-AD's point-cloud TIFFs compress better than photographs), and a
# checksum-valid archive past them is kept, not deleted.
_MAX_EXPANSION = 20  # unpacked bytes per archive byte...
_MIN_UNPACKED_BYTES = 1 << 30  # ...but never less than 1 GiB, whatever the archive's size
_MAX_MEMBERS = 500_000  # files, folders and links; the benchmarks' archives hold some thousands
_MAX_LINK_HOPS = 40  # symbolic links followed while resolving one path (Linux's own limit)


@dataclass(frozen=True)
class DownloadInfo:
    """One official archive and how its content maps onto ``data.root``.

    ``subdir`` is the folder inside the archive that becomes ``data.root`` ("" when the
    archive's top level already is it); ``categories`` and ``extra`` are the paths that
    ``data.root`` must then hold directly. At least one of ``sha256``/``md5`` is required
    before anything is downloaded; every one given is checked.
    """

    name: str
    urls: tuple[str, ...]  # tried in order; mirrors must serve the identical file
    archive: str  # file name; its suffix selects tar or zip
    categories: tuple[str, ...]
    layout: str  # what data.root looks like afterwards, for people
    source: str  # where the URL and checksum were found
    sha256: str | None = None
    md5: str | None = None
    subdir: str = ""
    extra: tuple[str, ...] = ()



DOWNLOADS: dict[str, DownloadInfo] = {
    "mvtec": DownloadInfo(
        name="MVTec AD",
        # MVTec rotates its mydrive.ch share links; both point at the same file (same sha256).
        urls=(
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
            "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        ),
        archive="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        categories=MVTEC_CATEGORIES,
        layout="<data.root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}",
        source="anomalib src/anomalib/data/datamodules/image/mvtecad.py (DOWNLOAD_INFO, sha256)",
    ),
    "visa": DownloadInfo(
        name="VisA",
        urls=("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
        archive="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        categories=VISA_CATEGORIES,
        extra=("split_csv/1cls.csv",),
        layout=(
            "<data.root>/split_csv/1cls.csv and <data.root>/<category>/{Data/Images/{Normal,Anomaly}, "
            "Data/Masks/Anomaly, image_anno.csv} (the raw release; 1cls.csv paths are relative to data.root)"
        ),
        source="anomalib src/anomalib/data/datamodules/image/visa.py (DOWNLOAD_INFO, sha256)",
    ),
    "btad": DownloadInfo(
        name="BTAD",
        urls=("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
        archive="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        subdir="BTech_Dataset_transformed",
        categories=BTAD_CATEGORIES,
        layout="<data.root>/<01|02|03>/{train/ok, test/{ok,ko}, ground_truth/ko}",
        source="anomalib src/anomalib/data/datamodules/image/btech.py (DOWNLOAD_INFO, sha256)",
    ),
    "mvtec3d": DownloadInfo(
        name="MVTec 3D-AD",
        urls=(
            "https://www.mydrive.ch/shares/45920/dd1eb345346df066c63b5c95676b961b/"
            "download/428824485-1643285832/mvtec_3d_anomaly_detection.tar.xz",
        ),
        archive="mvtec_3d_anomaly_detection.tar.xz",
        md5="d8bb2800fbf3ac88e798da6ae10dc819",  # no public sha256 exists for this archive
        categories=MVTEC3D_CATEGORIES,
        layout="<data.root>/<category>/{train/good/{rgb,xyz}, validation, test/<defect>/{rgb,xyz,gt}}",
        source=(
            "anomalib src/anomalib/data/datamodules/depth/mvtec_3d.py (DOWNLOAD_INFO); an md5, "
            "which anomalib <= 0.7 verified with hashlib.md5"
        ),
    ),
    "mvtec_loco": DownloadInfo(
        name="MVTec LOCO AD",
        urls=(
            "https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/"
            "download/430647091-1646842701/mvtec_loco_anomaly_detection.tar.xz",
        ),
        archive="mvtec_loco_anomaly_detection.tar.xz",
        sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
        categories=MVTEC_LOCO_CATEGORIES,
        layout=("<data.root>/<category>/{train/good, validation/good, test/<type>, ground_truth/<type>/<NNN>, "
                "defects_config.json}"),
        source="anomalib src/anomalib/data/datasets/image/mvtec_loco.py (DOWNLOAD_INFO, sha256)",
    ),
    "mvtec_ad2": DownloadInfo(
        name="MVTec AD 2",
        urls=(
            "https://www.mydrive.ch/shares/150997/701c90d3aea6588f404936e32a674602/"
            "download/466712769-1743429042/mvtec_ad_2.tar.gz",
        ),
        archive="mvtec_ad_2.tar.gz",
        sha256="c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4",
        categories=MVTEC_AD2_CATEGORIES,
        layout=("<data.root>/<category>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, "
                "test_private, test_private_mixed}"),
        source="anomalib src/anomalib/data/datamodules/image/mvtecad2.py (DOWNLOAD_INFO, sha256)",
    ),
}

# One line each: UserError messages are printed on a single line. "<data.root>" is
# replaced by the real folder in messages.
MANUAL_STEPS: dict[str, str] = {
    "mvtec": (
        "MVTec AD: 1) open https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads, accept the "
        "licence (CC BY-NC-SA 4.0) and download the whole dataset, mvtec_anomaly_detection.tar.xz (4.9 GiB); "
        "2) extract it into the folder: mkdir -p <data.root> && tar -xJf mvtec_anomaly_detection.tar.xz -C "
        "<data.root>, so that <data.root>/bottle/train/good exists; 3) set data.root=<data.root>. Or put the "
        "archive at <data.root>/.download/mvtec_anomaly_detection.tar.xz and rerun with data.download=true: "
        "it is then verified and extracted for you."
    ),
    "visa": (
        "VisA: 1) download https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar "
        "(1.8 GiB, linked from https://github.com/amazon-science/spot-diff); 2) extract it into the folder: "
        "mkdir -p <data.root> && tar -xf VisA_20220922.tar -C <data.root> (the archive has no top folder), so "
        "that <data.root>/split_csv/1cls.csv and <data.root>/candle/Data/Images exist; no conversion to "
        "train/test folders is needed, the loader reads 1cls.csv; 3) if split_csv/1cls.csv is missing, save "
        "https://github.com/amazon-science/spot-diff/blob/main/split_csv/1cls.csv as "
        "<data.root>/split_csv/1cls.csv; 4) set data.root=<data.root>."
    ),
    "btad": (
        "BTAD: 1) download https://avires.dimi.uniud.it/papers/btad/btad.zip (see "
        "https://github.com/pankajmishra000/VT-ADL); 2) unzip it: it holds one folder, "
        "BTech_Dataset_transformed; 3) move that folder's content into <data.root>, so that "
        "<data.root>/01/train/ok exists; 4) set data.root=<data.root>."
    ),
    "mvtec3d": (
        "MVTec 3D-AD: 1) open https://www.mvtec.com/company/research/datasets/mvtec-3d-ad/downloads, accept "
        "the licence (CC BY-NC-SA 4.0) and download the whole dataset, mvtec_3d_anomaly_detection.tar.xz; "
        "2) extract it: mkdir -p <data.root> && tar -xJf mvtec_3d_anomaly_detection.tar.xz -C <data.root>, "
        "so that <data.root>/bagel/train/good/rgb exists; 3) set data.root=<data.root>."
    ),
    "mvtec_loco": (
        "MVTec LOCO AD: 1) open https://www.mvtec.com/company/research/datasets/mvtec-loco/downloads, accept the "
        "licence (CC BY-NC-SA 4.0) and download mvtec_loco_anomaly_detection.tar.xz; 2) extract it: mkdir -p "
        "<data.root> && tar -xJf mvtec_loco_anomaly_detection.tar.xz -C <data.root>, so that "
        "<data.root>/juice_bottle/train/good and <data.root>/juice_bottle/defects_config.json exist; 3) set "
        "data.root=<data.root>. Or put the archive at <data.root>/.download/mvtec_loco_anomaly_detection.tar.xz "
        "and rerun with data.download=true: it is then verified and extracted for you."
    ),
    "mvtec_ad2": (
        "MVTec AD 2: 1) open https://www.mvtec.com/company/research/datasets/mvtec-ad-2/downloads, accept the "
        "licence (CC BY-NC-SA 4.0) and download mvtec_ad_2.tar.gz; 2) extract it: mkdir -p <data.root> && tar "
        "-xzf mvtec_ad_2.tar.gz -C <data.root>, so that <data.root>/vial/train/good and "
        "<data.root>/vial/test_public exist; 3) set data.root=<data.root>. Or put the archive at "
        "<data.root>/.download/mvtec_ad_2.tar.gz and rerun with data.download=true: it is then verified and "
        "extracted for you."
    ),
    "mpdd": (
        "MPDD has no direct download link: 1) open the OneDrive folder linked from "
        "https://github.com/stepanje/MPDD (https://vutbr-my.sharepoint.com/:f:/g/personal/xjezek16_vutbr_cz/"
        "EhHS_ufVigxDo3MC6Lweau0BVMuoCmhMZj6ddamiQ7-FnA) and download the category folders (bracket_black, "
        "bracket_brown, bracket_white, connector, metal_plate, tubes); 2) unzip them into <data.root>, so "
        "that <data.root>/bracket_black/train/good exists (MVTec AD layout); 3) set data.root=<data.root>."
    ),
    "eyecandies": (
        "Eyecandies has no direct download link (one Google Drive file per category): 1) open "
        "https://eyecan-ai.github.io/eyecandies/download and download the categories you need, or run "
        "'pip install git+https://github.com/eyecan-ai/eyecandies.git' then 'pipelime -m eyecandies ec-get "
        "+o <data.root>'; 2) extract each category's archive into <data.root>/<Name> with the spaces removed "
        "(CandyCane, ChocolateCookie, ChocolatePraline, Confetto, GummyBear, HazelnutTruffle, "
        "LicoriceSandwich, Lollipop, Marshmallow, PeppermintCandy), so that "
        "<data.root>/CandyCane/train/data and <data.root>/CandyCane/test_public/data exist; "
        "3) set data.root=<data.root>."
    ),
}

_ALIASES = {"mvtecad": "mvtec", "btech": "btad", "mvtec3dad": "mvtec3d"}


class _Interrupted(Exception):
    """The connection failed or ended before the whole file arrived; a retry may resume."""


def ensure_downloaded(
    dataset: str,
    root: str | Path,
    *,
    registry: Mapping[str, DownloadInfo] | None = None,
    progress: bool = True,
    categories: Sequence[str] | None = None,
) -> Path:
    """Return ``root`` once it holds ``dataset`` in the layout the loaders expect.

    Nothing is fetched when ``root`` already has the completion marker, or every
    expected category folder (only those in ``categories`` when given) plus the
    dataset's extra files. Otherwise the archive is downloaded into
    ``root/.download/<archive>.part`` (resuming a previous partial file with an HTTP
    Range request), verified against its checksum, extracted into a temporary folder
    inside ``root`` with every member checked, moved into place without overwriting
    anything already there, and the marker is written last. An archive placed by hand
    at ``root/.download/<archive>`` is verified and used instead of downloading.

    ``registry`` replaces ``DOWNLOADS`` (tests point it at a local server). Raises
    ``UserError`` for a dataset without a direct archive (with the manual steps), a
    network failure, a checksum mismatch, an unsafe or unexpected archive, or one past
    the extraction limits (a decompression or file-count bomb; the archive is then kept).
    """
    registry = DOWNLOADS if registry is None else registry
    key = _resolve(dataset, registry)
    root = Path(root).expanduser()
    if key not in registry:
        raise UserError(f"there is no automatic download for '{dataset}'. {_manual(key, root)}")
    info = registry[key]
    wanted = tuple(categories) if categories else info.categories
    unknown = sorted(set(wanted) - set(info.categories))
    if unknown:
        raise UserError(f"unknown {info.name} categories {unknown}; choose among {list(info.categories)}")
    if _is_present(root, key, info, wanted):
        return root
    if not (info.sha256 or info.md5):
        raise UserError(
            f"the download table has no checksum for {info.name}, so it will not be fetched unverified; "
            f"add its sha256 to datasets/download.py, or get it by hand. {_manual(key, root)}"
        )

    work = root / _DOWNLOAD_DIR
    try:
        work.mkdir(parents=True, exist_ok=True)
        with _exclusive(work / f"{key}.lock", progress):
            if _is_present(root, key, info, wanted):  # another process finished meanwhile
                return root
            archive = work / info.archive
            if archive.exists():
                _verify(archive, info, key, root, delete_on_mismatch=False)
            else:
                part = work / f"{info.archive}.part"
                url = _download(info, part, key, root, progress)
                _verify(part, info, key, root, delete_on_mismatch=True, url=url)
                os.replace(part, archive)
            _install(archive, info, key, root, progress)
            _write_marker(root, key, info)
            archive.unlink()
    except UserError:
        raise
    except OSError as exc:  # local trouble: disk full, permissions, read-only mount
        raise UserError(
            f"cannot write {info.name} into {root} ({exc}); free space or fix the folder's permissions, then rerun"
        ) from None
    return root


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _resolve(dataset: str, registry: Mapping[str, DownloadInfo]) -> str:
    """Map a user's spelling (``MVTec-AD``, ``mvtec_3d``) onto a table key, or raise."""
    wanted = _normalise(dataset)
    wanted = _ALIASES.get(wanted, wanted)
    for key in [*registry, *MANUAL_STEPS]:
        if _normalise(key) == wanted:
            return key
    known = sorted({*registry, *MANUAL_STEPS})
    raise UserError(
        f"no download is known for dataset '{dataset}'; choose one of {known}, "
        f"or set data.root to a copy you made yourself"
    )


def _manual(key: str, root: Path) -> str:
    """The manual steps for ``key`` with the real folder filled in."""
    steps = MANUAL_STEPS.get(
        key, "Download the archive by hand and extract it into <data.root>, so that it holds the category folders directly."
    )
    return steps.replace("<data.root>", str(root))


def _marker(root: Path, key: str) -> Path:
    return root / _DOWNLOAD_DIR / f"{key}.complete"


def _is_present(root: Path, key: str, info: DownloadInfo, categories: Sequence[str]) -> bool:
    """True when the marker exists, or the wanted category folders and extra files all do."""
    if _marker(root, key).is_file():
        return True
    return all((root / c).is_dir() for c in categories) and all((root / e).exists() for e in info.extra)


@contextmanager
def _exclusive(lock_path: Path, progress: bool) -> Iterator[None]:
    """Serialise concurrent callers (e.g. one per DDP rank) on the same root; POSIX only."""
    lock = FileLock(lock_path)
    if not lock.acquire():
        if progress:
            print(f"waiting for another process downloading into {lock_path.parent.parent}", file=sys.stderr)
        lock.acquire(wait=True)
    with lock:
        yield


def _download(info: DownloadInfo, part: Path, key: str, root: Path, progress: bool) -> str:
    """Bring ``part`` to the complete archive from the first URL that works; return that URL."""
    failures: list[str] = []
    for url in info.urls:
        if not url.startswith(("http://", "https://")):
            failures.append(f"{url}: only http(s) URLs are allowed")
            continue
        for attempt in range(_ATTEMPTS):
            if attempt:
                time.sleep(0.5 * attempt)  # brief back-off before resuming
            if progress and attempt == 0:
                print(f"downloading {info.name} from {url} into {part.parent}", file=sys.stderr)
            try:
                _fetch(url, part, info.archive, progress)
                return url
            except HTTPError as exc:  # a definite answer (404, 403, ...): try the next URL
                failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
                break
            except _Interrupted as exc:
                reason = str(exc)
        else:
            kept = part.stat().st_size if part.exists() else 0
            if kept:
                raise UserError(
                    f"the download of {info.name} from {url} was interrupted {_ATTEMPTS} times ({reason}); "
                    f"{kept} bytes are kept in {part}; rerun the same command to resume, or get it by hand. "
                    f"{_manual(key, root)}"
                )
            failures.append(f"{url}: {reason}")
    raise UserError(
        f"could not download {info.name} ({'; '.join(failures)}); check the network or proxy and rerun, "
        f"or download it by hand. {_manual(key, root)}"
    )


def _fetch(url: str, part: Path, label: str, progress: bool) -> None:
    """Append the rest of ``url`` to ``part``, or restart it from zero when resuming is impossible.

    Raises ``_Interrupted`` when the transfer stops early (the bytes received are kept)
    and ``HTTPError`` for any other HTTP error status.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "memkd-download/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=_TIMEOUT_S)
    except HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        total = _range_total(exc.headers.get("Content-Range"))
        exc.close()
        if total == offset:  # the part already holds the whole file; the checksum decides
            return
        part.unlink()  # larger than the file (or unknown): start over
        raise _Interrupted("the partial file did not fit the remote one; restarting from zero") from None
    except (URLError, OSError, http.client.HTTPException) as exc:
        raise _Interrupted(_reason(exc)) from None

    with response:
        resumed = offset and response.status == 206 and _range_start(response.headers.get("Content-Range")) == offset
        if offset and response.status == 206 and not resumed:
            part.unlink()  # a range we did not ask for: do not splice it in
            raise _Interrupted("the server answered an unexpected byte range; restarting from zero")
        start = offset if resumed else 0  # 200: the server ignored Range, so rewrite from zero
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length and length.isdigit() else None
        written = start
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=expected, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(_reason(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if expected is not None and written < expected:
        raise _Interrupted(f"the connection closed after {written} of {expected} bytes")


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    return str(inner or exc) or type(exc).__name__


def _range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/", header or "")
    return int(match.group(1)) if match else None


def _range_total(header: str | None) -> int | None:
    match = re.match(r"bytes [^/]+/(\d+)$", (header or "").strip())
    return int(match.group(1)) if match else None


def _verify(path: Path, info: DownloadInfo, key: str, root: Path, *, delete_on_mismatch: bool, url: str = "") -> None:
    """Check every checksum ``info`` gives, reading ``path`` once; raise on mismatch."""
    hashers = {name: hashlib.new(name) for name in ("sha256", "md5") if getattr(info, name)}
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    for name, hasher in hashers.items():
        expected, got = getattr(info, name).lower(), hasher.hexdigest()
        if got == expected:
            continue
        if delete_on_mismatch:
            path.unlink()
            raise UserError(
                f"the {name} checksum of {info.name} downloaded from {url} failed (expected {expected}, got {got}); "
                f"the file was deleted, rerun to download it again, or get it by hand. {_manual(key, root)}"
            )
        raise UserError(
            f"{path} is not the official {info.name} archive ({name} {got}, expected {expected}); "
            f"delete it and rerun to download it again"
        )


def _install(archive: Path, info: DownloadInfo, key: str, root: Path, progress: bool) -> None:
    """Extract ``archive`` into a temporary folder inside ``root``, check it, move it into place.

    Entries already present in ``root`` are kept as they are (a partial copy made by
    hand is completed, never overwritten). The temporary folder is always removed.
    """
    if progress:
        print(f"extracting {archive.name} into {root}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix="extract-", dir=root / _DOWNLOAD_DIR))
    try:
        _extract(archive, staging, info, progress)
        source = staging / info.subdir if info.subdir else staging
        missing = [p for p in (*info.categories, *info.extra) if not (source / p).exists()]
        if missing:
            found = sorted(p.name for p in staging.iterdir())
            raise UserError(
                f"{archive.name} does not have the expected {info.name} layout: {missing} are missing under "
                f"'{info.subdir or '.'}' (top level holds {found}); nothing was installed. {_manual(key, root)}"
            )
        for entry in sorted(source.iterdir()):
            target = root / entry.name
            if entry.name != _DOWNLOAD_DIR and not target.exists() and not target.is_symlink():
                os.replace(entry, target)  # same filesystem: a rename, no copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Path, dest: Path, info: DownloadInfo, progress: bool) -> None:
    """Unpack ``archive`` into ``dest``, refusing members that could write outside it and bombs."""
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, dest, progress)
        elif name.endswith(_TAR_SUFFIXES):
            _extract_tar(archive, dest, info.subdir, progress)
        else:
            raise UserError(f"cannot unpack {archive.name}: only .zip and {', '.join(_TAR_SUFFIXES)} archives are supported")
    except _TooLarge as exc:
        # A checksum-valid archive beyond our limits: keep it, a download of gigabytes is costly to repeat.
        raise UserError(
            f"refusing to extract {archive.name}: member {exc.member!r} {exc.why}; nothing was installed and the "
            f"archive is kept in {archive.parent}. Check the {info.name} entry and the limits in datasets/download.py"
        ) from None
    except _Unsafe as exc:
        archive.unlink(missing_ok=True)  # checksum-valid yet hostile: only a wrong table entry gets here
        raise UserError(
            f"refusing to extract {archive.name}: member {exc.member!r} {exc.why}; nothing was installed and "
            f"the archive was deleted. Check the {info.name} entry in datasets/download.py"
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {archive} ({exc}); delete it and rerun to download it again") from None


class _Unsafe(Exception):
    """A member that would write, link or point outside the extraction folder, or is no plain file."""

    def __init__(self, member: str, why: str) -> None:
        super().__init__(f"{member}: {why}")
        self.member, self.why = member, why


class _TooLarge(_Unsafe):
    """A member past the size or member-count limits (a decompression or file-count bomb)."""


class _Budget:
    """The size and member-count limits of one archive's extraction, spent member by member."""

    def __init__(self, archive_bytes: int) -> None:
        self.max_bytes = max(_MIN_UNPACKED_BYTES, _MAX_EXPANSION * archive_bytes)
        self.bytes = 0
        self.members = 0

    def take(self, member: str, size: int) -> None:
        """Count one member of ``size`` unpacked bytes; raise _TooLarge once past a limit."""
        self.members += 1
        self.bytes += max(size, 0)
        if self.members > _MAX_MEMBERS:
            raise _TooLarge(member, f"is past the limit of {_MAX_MEMBERS:,} members (a file-count bomb?)")
        if self.bytes > self.max_bytes:
            raise _TooLarge(member, f"takes the unpacked size past {self.max_bytes:,} bytes, the limit for this "
                                    f"archive (a decompression bomb?)")


def _is_absolute(name: str) -> bool:
    """True for '/x', '\\x' and Windows drive paths ('C:x', 'C:\\x'), whatever the host system."""
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _check_name(name: str) -> None:
    """Refuse absolute paths, Windows drives and '..' components, whatever the separator."""
    parts = name.replace("\\", "/").split("/")
    if _is_absolute(name):
        raise _Unsafe(name, "has an absolute path")
    if ".." in parts:
        raise _Unsafe(name, "climbs out of the target folder with '..'")


def _components(path: str) -> list[str]:
    """The components of an archive path or link target, split at '/' and '\\' (both, to be safe)."""
    return [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]


def _key(component: str) -> str:
    """How a file system may compare one name: case- and Unicode-form-insensitively (macOS, Windows).

    Comparing names this way makes two names that are distinct on Linux the same entry, which
    can only make the check stricter: a link the real file system follows is always seen.
    """
    return unicodedata.normalize("NFC", component).casefold()


class _ExtractedTree:
    """What the extraction has created so far: each path's kind ('dir', 'file', 'link') and link targets.

    Paths are tuples of :func:`_key` components below the extraction folder, never through a
    link: every link is resolved, through the links extracted before it, as the file system will.
    That is what a lexical check misses: ``d/y -> ..`` and ``z -> d/y/..`` each look inside, yet
    ``z`` is the folder above. Where the stdlib's 'data' filter is missing this is the whole defence.

    ``installed`` is the archive folder that becomes ``data.root`` (``DownloadInfo.subdir``): links
    inside it must stay inside it, since whatever lies around it is not installed.
    """

    def __init__(self, installed: str = "") -> None:
        self.kinds: dict[tuple[str, ...], str] = {(): "dir"}
        self.links: dict[tuple[str, ...], tuple[str, str]] = {}  # path -> (target, member name)
        self.installed = tuple(_key(part) for part in _components(installed))

    def resolve(self, start: tuple[str, ...], parts: Sequence[str], member: str,
                top: tuple[str, ...] = ()) -> tuple[str, ...]:
        """``parts`` followed from the folder ``start``, through every link; _Unsafe if it goes above ``top``.

        ``start`` lies in ``top``. Paths not extracted yet count as folders, as ``os.makedirs``
        would make them.
        """
        resolved = list(start)
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if len(resolved) <= len(top):
                    raise _Unsafe(member, "leads outside the folder it is extracted into (through '..' or a "
                                          "symbolic link)")
                resolved.pop()
                continue
            path = (*resolved, _key(part))
            kind = self.kinds.get(path)
            if kind == "link":
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise _Unsafe(member, "goes through a loop of symbolic links")
                pending[:0] = _components(self.links[path][0])  # relative to the link's own folder
                continue
            if kind == "file" and pending:
                raise _Unsafe(member, f"puts something under the file {part!r}")
            resolved.append(_key(part))
        return tuple(resolved)

    def _top(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """The folder a link at ``path`` must not leave: the installed folder, or the extraction folder."""
        return self.installed if path[:len(self.installed)] == self.installed else ()

    def add(self, member: tarfile.TarInfo) -> None:
        """Check ``member`` against what is already extracted, then record it; _Unsafe to refuse it."""
        name = member.name
        parts = _components(name)
        if not parts:
            if member.isdir():
                return  # the extraction folder itself ('./')
            raise _Unsafe(name, "has no file name")
        folder = self.resolve((), parts[:-1], name)
        path = (*folder, _key(parts[-1]))
        existing = self.kinds.get(path)
        if existing == "link":
            raise _Unsafe(name, "would replace, or write through, a symbolic link extracted before it")
        if member.issym():
            if existing is not None:
                raise _Unsafe(name, f"replaces a {existing} extracted before it with a symbolic link")
            if _is_absolute(member.linkname):
                raise _Unsafe(name, f"links to the absolute path {member.linkname!r}")
            self._check_link(path, member.linkname, name)
            self.kinds[path] = "link"
            self.links[path] = (member.linkname, name)
        elif member.islnk():
            # Hard-link targets are archive paths; the link must be to a file, never to a symbolic
            # link (which would be re-read relative to its new place).
            if _is_absolute(member.linkname):
                raise _Unsafe(name, f"links to the absolute path {member.linkname!r}")
            target_parts = _components(member.linkname)
            try:
                target = (*self.resolve((), target_parts[:-1], name), _key(target_parts[-1])) if target_parts else ()
            except _Unsafe as exc:
                raise _Unsafe(name, f"links outside the target folder ({member.linkname!r}): {exc.why}") from None
            if self.kinds.get(target) != "file":
                raise _Unsafe(name, f"is a hard link to {member.linkname!r}, which is not a file extracted before it")
            self._record(path, "file", existing, name)
        elif member.issparse():
            raise _Unsafe(name, "is a sparse file (not expected in a dataset archive)")
        elif member.isreg():
            self._record(path, "file", existing, name)
        elif member.isdir():
            self._record(path, "dir", existing, name)
        else:
            raise _Unsafe(name, "is a device, FIFO or other special file")

    def _check_link(self, path: tuple[str, ...], target: str, member: str, later: bool = False) -> None:
        try:
            self.resolve(path[:-1], _components(target), member, self._top(path))
        except _Unsafe as exc:
            when = " once later members are extracted" if later else ""
            raise _Unsafe(member, f"links outside the target folder ({target!r}){when}: {exc.why}") from None

    def _record(self, path: tuple[str, ...], kind: str, existing: str | None, member: str) -> None:
        if existing is not None and existing != kind:
            raise _Unsafe(member, f"replaces a {existing} extracted before it with a {kind}")
        for depth in range(1, len(path)):
            self.kinds.setdefault(path[:depth], "dir")  # made by os.makedirs on the way
        self.kinds[path] = kind

    def check_links(self) -> None:
        """Re-resolve every link once all members are out (a later link may have moved an earlier
        one's target), and refuse an installed folder that is itself a link."""
        for depth in range(1, len(self.installed) + 1):
            if self.kinds.get(self.installed[:depth]) == "link":
                raise _Unsafe(self.links[self.installed[:depth]][1], "is a symbolic link where the dataset's "
                                                                      "folder must be a real folder")
        for path, (target, member) in self.links.items():
            self._check_link(path, target, member, later=True)


def _without_privileges(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A copy of ``member`` whose mode and owner are safe to apply, as the 'data' filter would make them.

    Used only where that filter is missing: no setuid, setgid or sticky bits, no group or other
    write permission, readable and writable by its owner, and owned by whoever extracts it (tarfile
    would otherwise chown to the archive's owner when run as root).
    """
    safe = copy.copy(member)
    mode = member.mode & 0o755
    if member.isdir():
        mode |= 0o700
    else:
        if not mode & 0o100:
            mode &= ~0o111  # executable by group or others only: by nobody
        mode |= 0o600
    safe.mode = mode
    safe.uid, safe.gid = getattr(os, "getuid", lambda: 0)(), getattr(os, "getgid", lambda: 0)()
    safe.uname = safe.gname = ""
    return safe


def _extract_tar(archive: Path, dest: Path, installed: str, progress: bool) -> None:
    # One streaming pass (a 5 GB .tar.xz is slow to decompress twice): each member is
    # checked just before it is written; on refusal the caller deletes the whole staging folder.
    tree = _ExtractedTree(installed)
    budget = _Budget(archive.stat().st_size)
    with tarfile.open(archive, "r:*") as tar, tqdm(unit=" files", desc="extracting", disable=not progress, leave=False) as bar:
        for member in tar:
            _check_name(member.name)
            budget.take(member.name, member.size if member.isreg() else 0)
            tree.add(member)
            try:
                tar.extract(member if _TAR_FILTER else _without_privileges(member), dest, **_TAR_FILTER)
            except tarfile.FilterError as exc:
                raise _Unsafe(member.name, str(exc)) from None
            bar.update()
    tree.check_links()


def _extract_zip(archive: Path, dest: Path, progress: bool) -> None:
    budget = _Budget(archive.stat().st_size)
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:  # the central directory is cheap to read: check everything first
            _check_name(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no Unix file type
            if kind == stat.S_IFLNK:
                raise _Unsafe(info.filename, "is a symbolic link (not expected in a dataset archive)")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _Unsafe(info.filename, "is a device, FIFO or other special file")
            # zipfile never writes more than the declared size (it stops there and checks the CRC),
            # so the declared sizes bound what is written, overlapping-entry bombs included.
            budget.take(info.filename, info.file_size)
        top = dest.resolve()
        for info in tqdm(members, unit=" files", desc="extracting", disable=not progress, leave=False):
            if not (dest / info.filename).resolve().is_relative_to(top):
                raise _Unsafe(info.filename, "resolves outside the target folder")
            zf.extract(info, dest)


def _write_marker(root: Path, key: str, info: DownloadInfo) -> None:
    """Record the finished install; written last, so it only exists after a full success."""
    record = {"dataset": key, "name": info.name, "archive": info.archive, "sha256": info.sha256, "md5": info.md5}
    tmp = _marker(root, key).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, _marker(root, key))
