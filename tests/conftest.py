"""Fixtures shared across packages: the real clips in ../shared/realdata and a small built-in
dataset (generated mp4 files -> manifest -> shards), built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = (REPO / ".." / "shared" / "realdata").resolve()

# One small synthetic dataset for every test that needs real shards: 6 classes, 6 speakers.
SYNTH_TEST_SIZE = dict(num_speakers=6, clips_per_speaker_class=2, frame_size=64, fps=25, seconds=2.56)
SHARD_TEST_SIZE = dict(num_frames=8, frame_stride=4, img_size=64, samples_per_shard=16)


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    if not (REALDATA / "manifest.csv").is_file():
        pytest.fail(f"real test clips not found at {REALDATA}: the repository expects ../shared/realdata")
    return REALDATA


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory) -> Path:
    """manifest.csv of a freshly generated built-in dataset (real mp4 files)."""
    from data_pipelines.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    return generate(out, SynthConfig(seed=0, **SYNTH_TEST_SIZE))


@pytest.fixture(scope="session")
def write_test_shards():
    """`write(manifest, out_dir) -> out_dir`: shards of any manifest at the test size (8 frames of 64 x 64)."""
    from data_pipelines.shards import ShardConfig, write_shards

    def write(manifest: Path, out_dir: Path) -> Path:
        write_shards(manifest, out_dir, ShardConfig(**SHARD_TEST_SIZE), workers=2, progress=False)
        return out_dir

    return write


@pytest.fixture(scope="session")
def synth_shards(synth_manifest, write_test_shards, tmp_path_factory) -> Path:
    """Shard directory (index.json, fold<k>-*.tar) of the built-in dataset, 8 frames of 64 x 64."""
    return write_test_shards(synth_manifest, tmp_path_factory.mktemp("synth_shards"))
