"""Real clips laid out the way HiCMAE's preprocessing leaves a dataset (github sunlicai/HiCMAE,
`preprocess/face_and_audio/extract_face.py`, `extract_audio.py`, `preprocess/creamd_av.py`), restated
here in our own code:

- face frames: OpenFace `FeatureExtraction -simalign -format_aligned jpg` writes one folder per clip
  with `frame_det_00_000001.jpg`, `frame_det_00_000002.jpg`, ... (face 00, frame number from 1) at the
  source frame rate; HiCMAE moves CREMA-D's `<clip>/<clip>_aligned/` folders to `face_aligned/<clip>/`
  and keeps the `<clip>/<clip>_aligned/` nesting for MSP-IMPROV;
- audio: 16 kHz mono 16-bit wavs (`AudioWAV/` for CREMA-D, `audio_16k/` for RAVDESS and MSP-IMPROV);
- annotation lists: `split0K/train.csv` and `split0K/test.csv` (MSP-IMPROV: `val.csv` in some
  folders), one clip per line, `<frame dir> <wav> <label>`, space-separated, no header, paths absolute
  on the authors' machine (`AUTHORS_ROOT`).

The pixels and sound are real (from ../shared/realdata, decoded with decord; audio resampled with
torchaudio), kept small: FRAMES frames of SIZE x SIZE per clip. Each dataset's own layout is added
as symlinks to the source clip, so its own adapter can scan the same clips.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image

AUTHORS_ROOT = "/data/public_datasets"  # stands for the authors' machine in the published lists
SOURCES = ("videoretalking_examples/4.mp4", "videoretalking_examples/1.mp4")  # real faces, 30 fps time base
FPS = 30
FRAMES = 30  # one second per clip
SIZE = 64
SR = 16000
SOURCE_SR = 44100  # the sources' AAC rate (../shared/realdata/README.md)

# Clips per dataset: name as the dataset spells it. CREMA-D: one or two per official actor block
# (six actors, so five speaker folds fit) and 1076_MTI_NEU_XX, which HiCMAE's broken-sample list names.
CREMAD_CLIPS = (
    "1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1019_DFA_SAD_XX", "1037_ITS_NEU_XX", "1055_TIE_FEA_XX",
    "1073_IWW_DIS_XX", "1091_MTI_ANG_XX", "1076_MTI_NEU_XX",
)  # fmt: skip
CREMAD_CLASSES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
CREMAD_BLOCKS = ((1001, 1018), (1019, 1036), (1037, 1054), (1055, 1072), (1073, 1091))
RAVDESS_RECORDINGS = ("01-03-01-01-01", "01-05-02-02-01")  # channel-emotion-intensity-statement-repetition
RAVDESS_ACTORS = (1, 2)
MSP_CLIPS = {  # clip id -> consensus label code (Evaluation.txt); session 1 and 2, both actors
    "S01A-F01-P-FM01": "A", "S01H-M01-S-MF01": "H", "S02N-F02-P-FM01": "N", "S02S-M02-R-MM01": "S",
}  # fmt: skip
MSP_CODES = ("A", "H", "N", "S")


@dataclass(frozen=True)
class Layout:
    root: Path  # where the datasets lie (what --rewrite-root maps AUTHORS_ROOT to)
    lists: Path  # lists/<dataset>/split0K/*.csv


class FrameSource:
    """FRAMES real frames (JPEG bytes) and their audio span (16 kHz) from one clip, decoded once."""

    def __init__(self, clip: Path):
        self.clip = clip
        reader = decord.VideoReader(str(clip))
        frames = reader.get_batch(_indices_at_fps(reader)).asnumpy()
        self.jpegs = [_jpeg(f) for f in frames]
        # decord reads the track at its own rate (44.1 kHz AAC here); torchaudio resamples it to 16 kHz as
        # HiCMAE's ffmpeg step does; torchaudio.save needs torchcodec (not installed), so soundfile writes.
        audio = decord.AudioReader(str(clip), sample_rate=SOURCE_SR, mono=True)
        wave = torch.from_numpy(audio[: round(FRAMES / FPS * SOURCE_SR)].asnumpy().astype(np.float32))
        self.wave = torchaudio.functional.resample(wave, SOURCE_SR, SR)[0].numpy()

    def write_frames(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(self.jpegs, 1):
            (folder / f"frame_det_00_{i:06d}.jpg").write_bytes(data)

    def write_wav(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, self.wave, SR, subtype="PCM_16")

    def link_video(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(self.clip)


def _indices_at_fps(reader: decord.VideoReader) -> list[int]:
    """The frame shown at each step of a FPS grid: real phone/web clips drop frames (1.mp4 holds 135
    frames in 6.1 s on a 30 fps time base), while OpenFace's output has one image per frame time."""
    starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    grid = np.arange(FRAMES) / FPS + 1e-3
    indices = np.searchsorted(starts, grid, side="right") - 1
    if starts[-1] < grid[-1]:
        raise ValueError(f"source clip shorter than {FRAMES / FPS:.2f} s")
    return indices.tolist()


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).resize((SIZE, SIZE), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_list(path: Path, entries: list[tuple[str, str, int]]) -> None:
    """A HiCMAE annotation list: `<frame dir> <wav> <label>` lines, no header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{video} {wav} {label}\n" for video, wav, label in entries))


def build(realdata: Path, out: Path) -> Layout:
    """Write the CREMA-D, RAVDESS and MSP-IMPROV parts under `out` (see the module docstring)."""
    sources = [FrameSource(realdata / s) for s in SOURCES]
    layout = Layout(out / "datasets", out / "lists")
    _cremad(sources, layout)
    _ravdess(sources, layout)
    _msp_improv(sources, layout)
    return layout


def _cremad(sources: list[FrameSource], layout: Layout) -> None:
    """CREMA-D/face_aligned/<clip>/, CREMA-D/AudioWAV/<clip>.wav, CREMA-D/VideoFlash/<clip>.mp4; five
    split folders whose test list holds one actor block each (HiCMAE's 18-actor blocks, the last 19)."""
    base = layout.root / "CREMA-D"
    entries = []
    for n, clip in enumerate(CREMAD_CLIPS):
        src = sources[n % len(sources)]
        src.write_frames(base / "face_aligned" / clip)
        src.write_wav(base / "AudioWAV" / f"{clip}.wav")
        src.link_video(base / "VideoFlash" / f"{clip}.mp4")
        actor, _, emotion, _ = clip.split("_")
        block = next(k for k, (a, b) in enumerate(CREMAD_BLOCKS) if a <= int(actor) <= b)
        authors = f"{AUTHORS_ROOT}/CREMA-D"
        entries.append(
            (
                block,
                (
                    f"{authors}/face_aligned/{clip}",
                    f"{authors}/AudioWAV/{clip}.wav",
                    CREMAD_CLASSES.index(emotion),
                ),
            )
        )
    for k in range(len(CREMAD_BLOCKS)):
        split = layout.lists / "crema-d" / f"split0{k + 1}"
        write_list(split / "train.csv", [e for b, e in entries if b != k])
        write_list(split / "test.csv", [e for b, e in entries if b == k])


def _ravdess(sources: list[FrameSource], layout: Layout) -> None:
    """RAVDESS/face_aligned/Actor_XX/02-... (frames of the video-only file), RAVDESS/audio_16k/Actor_XX/
    03-....wav (the audio-only file), RAVDESS/Actor_XX/01-....mp4 (full AV, for scan_ravdess); one split
    folder holding actor 1 out."""
    base = layout.root / "RAVDESS"
    authors = f"{AUTHORS_ROOT}/RAVDESS"
    train, test = [], []
    for n, (actor, rec) in enumerate((a, r) for a in RAVDESS_ACTORS for r in RAVDESS_RECORDINGS):
        src = sources[n % len(sources)]
        name = f"{rec}-{actor:02d}"
        src.write_frames(base / "face_aligned" / f"Actor_{actor:02d}" / f"02-{name}")
        src.write_wav(base / "audio_16k" / f"Actor_{actor:02d}" / f"03-{name}.wav")
        src.link_video(base / f"Actor_{actor:02d}" / f"01-{name}.mp4")
        emotion = int(rec.split("-")[1])
        entry = (
            f"{authors}/face_aligned/Actor_{actor:02d}/02-{name}",
            f"{authors}/audio_16k/Actor_{actor:02d}/03-{name}.wav",
            emotion - 1,
        )
        (test if actor == 1 else train).append(entry)
    write_list(layout.lists / "ravdess" / "split01" / "train.csv", train)
    write_list(layout.lists / "ravdess" / "split01" / "test.csv", test)


def _msp_improv(sources: list[FrameSource], layout: Layout) -> None:
    """MSP-IMPROV/openface/sessionS/<scenario>/<type>/<clip>/<clip>_aligned/, MSP-IMPROV/audio_16k/...
    /<clip>.wav, the raw session tree with Evaluation.txt (for scan_msp_improv); split01 holds session 1
    out in a val list (as HiCMAE's does), split02 session 2 in a test list."""
    base = layout.root / "MSP-IMPROV"
    authors = f"{AUTHORS_ROOT}/MSP-IMPROV"
    held_out: dict[int, list] = {1: [], 2: []}
    evaluation = []
    for n, (clip_id, code) in enumerate(MSP_CLIPS.items()):
        src = sources[n % len(sources)]
        session = int(clip_id[1:3])
        name = f"MSP-IMPROV-{clip_id}"
        rel = f"session{session}/{clip_id[:4]}/{clip_id.split('-')[2]}"
        src.write_frames(base / "openface" / rel / name / f"{name}_aligned")
        src.write_wav(base / "audio_16k" / rel / f"{name}.wav")
        src.link_video(base / rel / f"{name}.avi")
        evaluation.append(f"UTD-IMPROV-{clip_id}.avi; {code}; A:3.0; V:3.0; D:3.0; N:5;")
        held_out[session].append(
            (
                f"{authors}/openface/{rel}/{name}/{name}_aligned",
                f"{authors}/audio_16k/{rel}/{name}.wav",
                MSP_CODES.index(code),
            )
        )
    (base / "Evaluation.txt").write_text("\n".join(evaluation) + "\n")
    for k, held_name in ((1, "val.csv"), (2, "test.csv")):
        split = layout.lists / "msp-improv" / f"split0{k}"
        write_list(split / "train.csv", held_out[3 - k])
        write_list(split / held_name, held_out[k])
