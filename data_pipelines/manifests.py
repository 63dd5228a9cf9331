"""Dataset layouts -> manifest CSV (docs/architecture.md), class names and fold schemes.

`emomae manifest <dataset> <root> --out manifest.csv [--folds K] [--seed S]`. One adapter per layout;
each returns `ManifestRow`s with absolute paths. The official label/split files each adapter reads
are listed in docs/data.md.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS = ("key", "video", "audio", "label", "label_name", "speaker", "fold", "split", "bbox")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".flv", ".webm", ".mpg", ".mpeg", ".m4v")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ManifestError(ValueError):
    """A dataset root or manifest that does not match what the adapter expects."""


@dataclass
class ManifestRow:
    key: str
    video: str
    audio: str = ""
    label: str = ""  # class index, or space-separated floats for regression, or "" (unlabelled)
    label_name: str = ""
    speaker: str = ""
    fold: int | None = None
    split: str = ""
    bbox: str = ""  # "x0 y0 x1 y1" in source pixels


@dataclass(frozen=True)
class DatasetInfo:
    """What `finetune` needs to know about a dataset: class names (index order) and folds."""

    name: str
    classes: tuple[str, ...]
    num_folds: int | None  # None: no official folds (use speaker_folds)
    fold_scheme: str
    task: str = "classification"  # classification | regression | none


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo(
            "crema-d",
            ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"),
            5,
            "actor blocks 1001-1018, 1019-1036, 1037-1054, 1055-1072, 1073-1091",
        ),
        DatasetInfo(
            "ravdess",
            ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
            6,
            "actors 1-4, 5-8, ..., 21-24",
        ),
        DatasetInfo(
            "mafw",
            (
                "anger",
                "disgust",
                "fear",
                "happiness",
                "neutral",
                "sadness",
                "surprise",
                "contempt",
                "anxiety",
                "helplessness",
                "disappointment",
            ),
            5,
            "official set_1..set_5 test lists",
        ),
        DatasetInfo(
            "dfew",
            ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
            5,
            "official set_1..set_5 test lists",
        ),
        DatasetInfo("msp-improv", ("anger", "happiness", "neutral", "sadness"), 6, "one session per fold"),
        DatasetInfo("voxceleb2", (), None, "none (unlabelled pretraining data)", task="none"),
        DatasetInfo("folder", (), None, "none, or speaker_folds with --folds", task="none"),
        DatasetInfo("hicmae", (), None, "from split0K/test lists, else speaker_folds with --folds"),
    ]
}


def dataset_info(name: str) -> DatasetInfo:
    """Look a dataset up by name, forgiving case and -/_ (`CREMA_D`, `cremad`, `crema-d`)."""
    norm = {re.sub(r"[-_ ]", "", k): v for k, v in DATASETS.items()}
    found = norm.get(re.sub(r"[-_ ]", "", name.lower()))
    if found is None:
        raise ManifestError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return found


# ---------------------------------------------------------------- folds


def speaker_folds(speakers: Sequence[str], k: int, seed: int = 0) -> dict[str, int]:
    """Speaker-independent folds: speaker -> fold in [0, k), folds balanced by clip count.

    speakers: one entry per clip (repeats count). Greedy: speakers in decreasing clip count (ties in
    a seeded random order) each go to the fold with the fewest clips so far.
    """
    counts = Counter(speakers)
    if "" in counts:
        raise ManifestError(
            f"{counts['']} clips have no speaker id; speaker-independent folds need one per clip"
        )
    if k < 2 or k > len(counts):
        raise ManifestError(f"cannot make {k} speaker-independent folds from {len(counts)} speakers")
    order = sorted(counts)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda s: -counts[s])  # stable: the shuffle breaks ties
    load = [0] * k
    out: dict[str, int] = {}
    for spk in order:
        fold = min(range(k), key=lambda f: (load[f], f))
        out[spk] = fold
        load[fold] += counts[spk]
    return out


# ---------------------------------------------------------------- helpers


def _find(root: Path, pattern: re.Pattern, suffixes: Iterable[str] = VIDEO_SUFFIXES) -> dict[str, Path]:
    """stem -> path of files under root whose name matches; for duplicated stems keep the format
    earliest in `suffixes` (a converted .mp4 wins over the original .flv)."""
    rank = {s: i for i, s in enumerate(suffixes)}
    found: dict[str, Path] = {}
    for path in root.rglob("*"):
        suf = path.suffix.lower()
        if suf in rank and pattern.match(path.name) and path.is_file():
            old = found.get(path.stem)
            if old is None or rank[suf] < rank[old.suffix.lower()]:
                found[path.stem] = path
    return found


def _sibling_audio(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in root.rglob("*.wav")}


def _require_root(root: Path, dataset: str) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise ManifestError(f"{dataset}: root {root} does not exist")
    return root


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: [A-Za-z0-9_-] only (a dot would split the key)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "clip"


def _unique_keys(rows: list[ManifestRow]) -> list[ManifestRow]:
    seen: Counter[str] = Counter()
    for row in rows:
        base = row.key
        seen[base] += 1
        if seen[base] > 1:
            row.key = f"{base}-{seen[base] - 1}"
    return rows


def _label(classes: Sequence[str], name: str) -> tuple[str, str]:
    return str(classes.index(name)), name


# ---------------------------------------------------------------- adapters


def scan_cremad(root: Path) -> list[ManifestRow]:
    """CREMA-D: `ActorID_Sentence_Emotion_Level.flv` (VideoFlash/) plus the matching AudioWAV/*.wav
    when present (the 16 kHz originals; otherwise the video's own track is used)."""
    root = _require_root(root, "CREMA-D")
    info = DATASETS["crema-d"]
    pat = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.\w+$")
    videos = _find(root, pat)
    if not videos:
        raise ManifestError(
            f"no files matching ActorID_Sentence_Emotion_Level.flv under {root}; CREMA-D expects e.g. "
            "VideoFlash/1001_DFA_ANG_XX.flv (or .mp4), actors 1001-1091, emotions ANG DIS FEA HAP NEU SAD"
        )
    wavs = _sibling_audio(root)
    blocks = [(1001, 1018), (1019, 1036), (1037, 1054), (1055, 1072), (1073, 1091)]
    rows = []
    for stem, path in sorted(videos.items()):
        actor, _, emo, _ = pat.match(path.name).groups()
        if emo not in info.classes:
            raise ManifestError(f"{path}: emotion {emo!r} is not one of {info.classes}")
        fold = next((f for f, (a, b) in enumerate(blocks) if a <= int(actor) <= b), None)
        if fold is None:
            raise ManifestError(f"{path}: actor {actor} outside CREMA-D's 1001-1091")
        label, name = _label(info.classes, emo)
        audio = str(wavs[stem]) if stem in wavs else ""
        rows.append(ManifestRow(stem, str(path), audio, label, name, actor, fold))
    return rows


def scan_ravdess(root: Path) -> list[ManifestRow]:
    """RAVDESS: `Modality-Channel-Emotion-Intensity-Statement-Repetition-Actor.mp4`; keeps full-AV
    (modality 01) speech (channel 01) files; label = emotion code - 1; fold = (actor - 1) // 4."""
    root = _require_root(root, "RAVDESS")
    info = DATASETS["ravdess"]
    pat = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.mp4$", re.IGNORECASE)
    found = _find(root, pat, (".mp4",))
    rows = []
    for stem, path in sorted(found.items()):
        modality, channel, emotion, _, _, _, actor = (int(g) for g in pat.match(path.name).groups())
        if modality != 1 or channel != 1:
            continue  # video-only, audio-only and song files are not part of the AV speech protocol
        if not 1 <= emotion <= 8 or not 1 <= actor <= 24:
            raise ManifestError(f"{path}: emotion {emotion} or actor {actor} outside RAVDESS's 1-8 / 1-24")
        label, name = _label(info.classes, info.classes[emotion - 1])
        rows.append(ManifestRow(stem, str(path), "", label, name, f"{actor:02d}", (actor - 1) // 4))
    if not rows:
        raise ManifestError(
            f"no full-AV speech files (01-01-EE-II-SS-RR-AA.mp4) under {root}; RAVDESS expects "
            "Actor_XX/01-01-03-02-01-01-12.mp4 from the Video_Speech_Actor_XX.zip archives"
            + (f" ({len(found)} other RAVDESS files were skipped)" if found else "")
        )
    return rows


def _official_sets(
    root: Path,
    dataset: str,
    files: Callable[[int], tuple[Path, Path]],
    read: Callable[[Path], list[tuple[str, str]]],
) -> dict[str, tuple[str, int]]:
    """clip id -> (label name, fold) from 5 official (train, test) list pairs; fold k-1 is the set
    whose *test* list holds the clip. Checks each set's lists partition the same clips."""
    out: dict[str, tuple[str, int]] = {}
    all_clips: set[str] | None = None
    for k in range(1, 6):
        train_file, test_file = files(k)
        for f in (train_file, test_file):
            if not f.is_file():
                raise ManifestError(
                    f"{dataset}: official split file {f} not found (root {root}); see docs/data.md"
                )
        train, test = read(train_file), read(test_file)
        clips = {c for c, _ in train} | {c for c, _ in test}
        if all_clips is not None and clips != all_clips:
            raise ManifestError(
                f"{dataset}: set_{k} lists cover {len(clips)} clips, set_1 covers {len(all_clips)}"
            )
        all_clips = clips
        for clip, name in test:
            if clip in out:
                raise ManifestError(
                    f"{dataset}: clip {clip} is in the test lists of set_{out[clip][1] + 1} and set_{k}"
                )
            out[clip] = (name, k - 1)
    return out


def _index_videos(folder: Path, dataset: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ManifestError(
            f"{dataset}: video folder {folder} not found; see docs/data.md for the expected layout"
        )
    return {p.stem.lstrip("0") or "0": p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES}


def _rows_from_sets(
    dataset: str, sets: dict[str, tuple[str, int]], videos: dict[str, Path]
) -> list[ManifestRow]:
    info = DATASETS[dataset]
    missing = [c for c in sets if c.lstrip("0") not in videos]
    if missing:
        raise ManifestError(
            f"{dataset}: {len(missing)} clips of the split files have no video, e.g. {missing[:3]}"
        )
    rows = []
    for clip, (name, fold) in sorted(sets.items()):
        path = videos[clip.lstrip("0")]
        label, name = _label(info.classes, name)
        rows.append(ManifestRow(sanitize_key(f"{dataset}_{path.stem}"), str(path), "", label, name, "", fold))
    return rows


def scan_dfew(root: Path) -> list[ManifestRow]:
    """DFEW: EmoLabel_DataSplit/{train,test}(single-labeled)/set_{1..5}.csv (`video_name,label`,
    label 1..7 = happy sad neutral angry surprise disgust fear) and clips under Clip/ named by the
    zero-padded video_name (e.g. Clip/clip_224x224/00001.mp4)."""
    root = _require_root(root, "DFEW")
    classes = DATASETS["dfew"].classes
    split_dir = root / "EmoLabel_DataSplit"

    def read(path: Path) -> list[tuple[str, str]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"video_name", "label"} <= set(reader.fieldnames):
                raise ManifestError(
                    f"DFEW: {path} must have the header video_name,label; got {reader.fieldnames}"
                )
            out = []
            for r in reader:
                code = int(r["label"])
                if not 1 <= code <= 7:
                    raise ManifestError(f"DFEW: {path}: label {code} of {r['video_name']} outside 1..7")
                out.append((str(int(r["video_name"])), classes[code - 1]))
            return out

    sets = _official_sets(
        root,
        "DFEW",
        lambda k: (
            split_dir / "train(single-labeled)" / f"set_{k}.csv",
            split_dir / "test(single-labeled)" / f"set_{k}.csv",
        ),
        read,
    )
    return _rows_from_sets("dfew", sets, _index_videos(root / "Clip", "DFEW"))


def scan_mafw(root: Path) -> list[ManifestRow]:
    """MAFW: `Train & Test Set/single/no_caption/set_{1..5}/{train,test}.txt` (lines
    `00025.mp4 anger`, 11 single-label class names) and clips in data/clips/."""
    root = _require_root(root, "MAFW")
    classes = DATASETS["mafw"].classes
    split_dir = root / "Train & Test Set" / "single" / "no_caption"

    def read(path: Path) -> list[tuple[str, str]]:
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in classes:
                raise ManifestError(
                    f"MAFW: {path}:{n}: expected '<clip>.mp4 <class>' with a class in {classes}, got {line!r}"
                )
            out.append((str(int(Path(parts[0]).stem)), parts[1]))
        return out

    sets = _official_sets(
        root,
        "MAFW",
        lambda k: (split_dir / f"set_{k}" / "train.txt", split_dir / f"set_{k}" / "test.txt"),
        read,
    )
    return _rows_from_sets("mafw", sets, _index_videos(root / "data" / "clips", "MAFW"))


def scan_msp_improv(root: Path) -> list[ManifestRow]:
    """MSP-IMPROV: session*/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.avi (+ .wav beside it) and the
    consensus labels of Evaluation.txt (`UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:..; V:..; D:..; N:..;`).
    Keeps consensus A/H/N/S; fold = session - 1 (the speaker token F01/M01 names the session)."""
    root = _require_root(root, "MSP-IMPROV")
    info = DATASETS["msp-improv"]
    labels_file = next((root / n for n in ("Evaluation.txt", "Evalution.txt") if (root / n).is_file()), None)
    if labels_file is None:
        raise ManifestError(f"MSP-IMPROV: consensus label file Evaluation.txt not found in {root}")
    code = {"A": "anger", "H": "happiness", "N": "neutral", "S": "sadness"}
    consensus = {}
    for line in labels_file.read_text(errors="replace").splitlines():
        m = re.match(r"^(?:UTD|MSP)-IMPROV-([A-Z0-9-]+)\.avi;\s*([A-Z])\s*;", line)
        if m:
            consensus[m.group(1)] = m.group(2)
    pat = re.compile(r"^MSP-IMPROV-(S\d\d[A-Z]-([MF])(\d\d)-[A-Z]-[MF]{2}\d\d)\.\w+$")
    videos = _find(root, pat, (".mp4", ".avi"))
    if not videos:
        raise ManifestError(f"MSP-IMPROV: no files named MSP-IMPROV-S01A-F01-P-FM01.avi under {root}")
    wavs = _sibling_audio(root)
    rows, dropped = [], Counter()
    for stem, path in sorted(videos.items()):
        clip_id, gender, session = pat.match(path.name).groups()
        label_code = consensus.get(clip_id)
        if label_code not in code:
            dropped[label_code or "no label"] += 1
            continue
        label, name = _label(info.classes, code[label_code])
        audio = str(wavs[stem]) if stem in wavs else ""
        rows.append(
            ManifestRow(
                sanitize_key(stem), str(path), audio, label, name, f"{gender}{session}", int(session) - 1
            )
        )
    if dropped:
        print(
            f"MSP-IMPROV: left out {sum(dropped.values())} clips without a 4-class consensus: {dict(dropped)}",
            file=sys.stderr,
        )
    return rows


def scan_voxceleb2(root: Path) -> list[ManifestRow]:
    """VoxCeleb2: `id*/<youtube id>/<clip>.mp4` (dev/mp4 or test/mp4), unlabelled, speaker = id."""
    root = _require_root(root, "VoxCeleb2")
    rows = []
    for path in sorted(root.rglob("id*/*/*.mp4")):
        spk, vid = path.parent.parent.name, path.parent.name
        if not re.fullmatch(r"id\d+", spk):
            continue
        parts = {p.lower() for p in path.relative_to(root).parts}
        split = "test" if "test" in parts else "train" if "dev" in parts else ""
        rows.append(
            ManifestRow(sanitize_key(f"{spk}_{vid}_{path.stem}"), str(path), speaker=spk, split=split)
        )
    if not rows:
        raise ManifestError(
            f"no files matching id*/VIDEO_ID/CLIP.mp4 under {root}; VoxCeleb2 expects e.g. dev/mp4/id00012/21Uxsk56VDQ/00001.mp4"
        )
    return rows


def scan_folder(root: Path, labels_from_parent: bool = False) -> list[ManifestRow]:
    """Every video file under `root` (recursive), unlabelled unless `labels_from_parent` (class =
    name of the containing folder, classes in sorted order)."""
    root = _require_root(root, "folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not paths:
        raise ManifestError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) under {root}")
    classes = sorted({p.parent.name for p in paths}) if labels_from_parent else []
    rows = []
    for p in paths:
        rel = p.relative_to(root).with_suffix("")
        row = ManifestRow(sanitize_key("-".join(rel.parts)), str(p))
        if labels_from_parent:
            row.label, row.label_name = _label(classes, p.parent.name)
        rows.append(row)
    return _unique_keys(rows)


def scan_hicmae(root: Path, rewrite_root: Sequence[str] = ()) -> list[ManifestRow]:
    """HiCMAE annotation lists: `<video or frame dir> <16 kHz wav> <label | 3 floats>` per line, no
    header. `root` is one list file, or a folder of them (train/val/test in the file name gives the
    split; lists under split0K/ give fold K-1 to the clips of their test list)."""
    root = Path(root).expanduser().resolve()
    rewrites = []
    for rule in rewrite_root:
        if "=" not in rule:
            raise ManifestError(f"--rewrite-root expects OLD=NEW, got {rule!r}")
        rewrites.append(tuple(rule.split("=", 1)))
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in {".csv", ".txt"})
    if not files:
        raise ManifestError(f"no annotation lists (*.csv/*.txt with '<video> <wav> <label>' lines) at {root}")
    entries: dict[str, dict] = {}
    for f in files:
        split = next((s for s in ("train", "val", "test") if s in f.stem.lower()), "")
        m = re.fullmatch(r"split_?0*(\d+)", f.parent.name.lower())
        fold = int(m.group(1)) - 1 if m and split == "test" else None
        for n, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 5):
                raise ManifestError(
                    f"{f}:{n}: expected '<video> <wav> <label>' or '<video> <wav> v a d', got {line!r}"
                )
            video, audio = (_rewrite(p, rewrites) for p in parts[:2])
            e = entries.setdefault(
                video, {"audio": audio, "label": " ".join(parts[2:]), "splits": set(), "fold": None}
            )
            e["splits"].add(split)
            e["fold"] = fold if fold is not None else e["fold"]
    multi_fold = any(e["fold"] is not None for e in entries.values())
    rows = []
    for video, e in entries.items():
        splits = e["splits"]
        # The reference's val lists are copies of its test lists: such a clip is a test clip.
        split = "" if multi_fold else ("test" if "test" in splits else next(iter(sorted(splits))))
        label = e["label"]
        if " " not in label:
            label = str(int(label))
        p = Path(video)
        rows.append(
            ManifestRow(
                sanitize_key(f"{p.parent.name}-{p.stem}" if p.stem.isdigit() else p.stem),
                video,
                e["audio"],
                label,
                fold=e["fold"],
                split=split,
            )
        )
    missing = [r.video for r in rows if not Path(r.video).exists()]
    if missing:
        hint = " (use --rewrite-root OLD=NEW: the published lists hold the authors' absolute paths)"
        raise ManifestError(
            f"{len(missing)} of {len(rows)} videos in {root} do not exist, e.g. {missing[0]}{hint}"
        )
    return _unique_keys(rows)


def _rewrite(path: str, rewrites: list[tuple[str, str]]) -> str:
    for old, new in rewrites:
        if path.startswith(old):
            return new + path[len(old) :]
    return path


ADAPTERS: dict[str, Callable[..., list[ManifestRow]]] = {
    "crema-d": scan_cremad,
    "ravdess": scan_ravdess,
    "mafw": scan_mafw,
    "dfew": scan_dfew,
    "msp-improv": scan_msp_improv,
    "voxceleb2": scan_voxceleb2,
    "folder": scan_folder,
    "hicmae": scan_hicmae,
}


# ---------------------------------------------------------------- CSV I/O


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> Path:
    """Write rows as the manifest CSV; video/audio paths relative to the CSV's folder when below it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    _check_keys([r.key for r in rows], path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            d = asdict(row)
            d["fold"] = "" if row.fold is None else row.fold
            for col in ("video", "audio"):
                if d[col] and Path(d[col]).is_absolute() and Path(d[col]).is_relative_to(base):
                    d[col] = str(Path(d[col]).relative_to(base))
            writer.writerow(d)
    return path


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read and check a manifest CSV; paths come back absolute (relative ones are resolved against
    the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("key", "video") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; expected header {','.join(COLUMNS)}")
        rows = []
        for n, rec in enumerate(reader, 2):
            rec = {c: (rec.get(c) or "").strip() for c in COLUMNS}
            try:
                fold = int(rec["fold"]) if rec["fold"] else None
            except ValueError:
                raise ManifestError(
                    f"{path}:{n}: fold must be an integer or empty, got {rec['fold']!r}"
                ) from None
            if not rec["video"]:
                raise ManifestError(f"{path}:{n}: empty video path for key {rec['key']!r}")
            for col in ("video", "audio"):
                if rec[col] and not Path(rec[col]).is_absolute():
                    rec[col] = str((path.parent / rec[col]).resolve())
            rows.append(ManifestRow(**{**rec, "fold": fold}))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    _check_keys([r.key for r in rows], path)
    return rows


def _check_keys(keys: list[str], where: Path) -> None:
    bad = [k for k in keys if not _KEY_RE.match(k)]
    if bad:
        raise ManifestError(
            f"{where}: keys must match [A-Za-z0-9_-]+ (WebDataset splits keys at dots), e.g. {bad[:3]}"
        )
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise ManifestError(f"{where}: duplicate keys, e.g. {dup[:3]}")


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emomae manifest", description="Scan a dataset root and write a manifest CSV."
    )
    p.add_argument("dataset", help=f"one of: {', '.join(ADAPTERS)}")
    p.add_argument("root", type=Path, help="dataset root (hicmae: an annotation list or a folder of them)")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument(
        "--folds", type=int, default=None, help="speaker-independent folds (replaces official ones)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --folds")
    p.add_argument(
        "--rewrite-root", action="append", default=[], metavar="OLD=NEW", help="hicmae: path prefix rewrite"
    )
    p.add_argument("--labels-from-parent", action="store_true", help="folder: class = parent folder name")
    args = p.parse_args(argv)
    try:
        info = dataset_info(args.dataset)
        kwargs = {"rewrite_root": args.rewrite_root} if info.name == "hicmae" else {}
        if info.name == "folder":
            kwargs = {"labels_from_parent": args.labels_from_parent}
        rows = ADAPTERS[info.name](args.root, **kwargs)
        if args.folds:
            assign = speaker_folds([r.speaker for r in rows], args.folds, args.seed)
            for r in rows:
                r.fold = assign[r.speaker]
        write_manifest(rows, args.out)
    except ManifestError as err:
        print(f"emomae manifest: {err}", file=sys.stderr)
        return 2
    folds = Counter(r.fold for r in rows if r.fold is not None)
    print(
        f"wrote {len(rows)} clips to {args.out}"
        + (f"; clips per fold {dict(sorted(folds.items()))}" if folds else "")
    )
    return 0
