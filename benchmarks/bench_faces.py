"""Cost of the face step (`emomae shards face=auto`) on one core: sampled frames per second.

Frames: the sampled frames of the GRID clips in ../shared/realdata (360 x 288, a frontal speaker),
resized to 480 x 360, CREMA-D's frame size, so the face is as small a part of the frame as there.
With OpenCV on one thread (what one shard worker has), for each round:

- detect: BlazeFace short range alone (letterbox + forward + decode + NMS) per frame;
- detect (full range): the full-range model, which runs only on clips where short range finds too
  few faces (faces under about a sixth of the frame's long side);
- face step: `face_track` over a clip's sampled frames (detect + gap filling + smoothing + squares);
- crop: `crop_resize` of each frame to 160 px with its face box (the crop face=none does too).

Rates are frames per CPU-second of this process (and per wall second); each figure is the median of
`--rounds` rounds. Target: face step >= 50 sampled frames/s. Prints a table and writes
benchmarks/results/bench_faces.json.

    python benchmarks/bench_faces.py [--clips 11] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.decode import SamplingConfig, crop_resize, sample_frame_indices, window_starts  # noqa: E402
from data_pipelines.face_track import FaceConfig, face_track  # noqa: E402
from data_pipelines.faces import FULL_RANGE, FaceDetector, detector_info  # noqa: E402

REALDATA = REPO / ".." / "shared" / "realdata"
FRAME_SIZE = (480, 360)  # CREMA-D's VideoFlash frames
TARGET = 50.0


def sampled_frames(path: Path, cfg: SamplingConfig) -> np.ndarray:
    """The frames the windows of `path` use, resized to FRAME_SIZE: (K, 360, 480, 3) uint8."""
    import cv2
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    starts = np.asarray(vr.get_frame_timestamp(range(len(vr))))[:, 0]
    duration = len(vr) / vr.get_avg_fps()
    wanted = sorted(
        {
            i
            for s in window_starts(duration, cfg.span, None)
            for i in sample_frame_indices(starts, duration, s, cfg.num_frames, cfg.frame_stride)[0]
        }
    )
    return np.stack(
        [cv2.resize(f, FRAME_SIZE, interpolation=cv2.INTER_LINEAR) for f in vr.get_batch(wanted).asnumpy()]
    )


def timed(fn, frames: int) -> dict:
    """Run fn once -> frames per CPU-second and per wall second."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_fps": frames / max(cpu, 1e-9), "wall_fps": frames / max(wall, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    import cv2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=11)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_faces.json")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)

    cfg = SamplingConfig()  # 16 frames, stride 4: 6.25 sampled frames per second of video
    clips = [
        sampled_frames(path, cfg) for path in sorted((REALDATA / "grid_lipnet").glob("*.mpg"))[: args.clips]
    ]
    n = sum(len(c) for c in clips)
    detector, far_detector, face = FaceDetector(), FaceDetector(FULL_RANGE), FaceConfig()
    tracks = [face_track(c, detector, face) for c in clips]  # warm-up, and the boxes the crop uses

    def detect_all():
        for c in clips:
            for frame in c:
                detector.detect(frame)

    def detect_far():
        for c in clips:
            for frame in c:
                far_detector.detect(frame)

    def track_all():
        for c in clips:
            face_track(c, detector, face)

    def crop_all():
        for c, t in zip(clips, tracks):
            for frame, box in zip(c, t.crops):
                crop_resize(frame, 160, tuple(box))

    paths = (
        ("detect", detect_all),
        ("detect (full range)", detect_far),
        ("face step", track_all),
        ("crop 160 px", crop_all),
    )
    rounds = {name: [] for name, _ in paths}
    for _ in range(args.rounds):
        for name, fn in paths:
            rounds[name].append(timed(fn, n))
    results = {
        name: {k: round(statistics.median(r[k] for r in rs), 1) for k in ("cpu_fps", "wall_fps")}
        for name, rs in rounds.items()
    }
    share = float(np.mean([t.share for t in tracks]))

    print(
        f"{n} sampled frames of {len(clips)} GRID clips at {FRAME_SIZE[0]}x{FRAME_SIZE[1]}, OpenCV "
        f"{cv2.__version__} on 1 thread, median of {args.rounds} rounds; face found on {share:.1%} of frames"
    )
    print(f"{'path':<20}{'frames/CPU-s':>14}{'frames/wall-s':>15}")
    for name, r in results.items():
        print(f"{name:<20}{r['cpu_fps']:>14.1f}{r['wall_fps']:>15.1f}")
    verdict = "meets" if results["face step"]["cpu_fps"] >= TARGET else "MISSES"
    print(f"face step {verdict} the target of {TARGET:g} sampled frames/s on one core")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "frames": n,
                "clips": len(clips),
                "frame_size": list(FRAME_SIZE),
                "rounds": args.rounds,
                "face_share": round(share, 4),
                "results": results,
                "target_fps": TARGET,
                "detector": detector_info(),
                "machine": {"python": platform.python_version(), "cpu": platform.processor()},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
