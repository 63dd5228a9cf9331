"""The `hicmae` adapter on real clips laid out as HiCMAE's preprocessing leaves them
(tests/data_pipelines/hicmae_layout.py): speakers, class names, splits and folds from the names, the
same keys as each dataset's own adapter, HiCMAE's broken CREMA-D clips left out and counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hicmae_layout as hl
import pytest
import soundfile as sf

from data_pipelines.adapters import scan_cremad, scan_hicmae, scan_msp_improv, scan_ravdess
from data_pipelines.manifest_cli import main
from data_pipelines.manifests import ManifestError, read_manifest


@pytest.fixture(scope="module")
def layout(realdata_dir, tmp_path_factory) -> hl.Layout:
    return hl.build(realdata_dir, tmp_path_factory.mktemp("hicmae_layout"))


def scan(layout: hl.Layout, lists: str):
    return scan_hicmae(layout.lists / lists, rewrite_root=[f"{hl.AUTHORS_ROOT}={layout.root}"])


def test_fixture_is_laid_out_as_hicmae_preprocessing_writes_it(layout):
    rows = scan(layout, "crema-d")
    assert rows
    for r in rows:
        frames = sorted(p.name for p in Path(r.video).iterdir())
        assert frames == [f"frame_det_00_{i:06d}.jpg" for i in range(1, hl.FRAMES + 1)]
        info = sf.info(r.audio)  # the paired 16 kHz wav goes with the frame folder
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - hl.FRAMES / hl.FPS) < 0.01


def test_cremad_lists_give_speaker_class_name_and_official_fold(layout):
    rows = scan(layout, "crema-d")
    for r in rows:
        actor, _, emotion, _ = r.key.split("_")
        block = next(k for k, (a, b) in enumerate(hl.CREMAD_BLOCKS) if a <= int(actor) <= b)
        assert (r.speaker, r.label_name, r.label, r.fold) == (
            actor,
            emotion,
            str(hl.CREMAD_CLASSES.index(emotion)),
            block,
        )
        assert r.split == ""  # five split folders: membership is the fold, not a split


def test_broken_cremad_clips_are_left_out_and_counted(layout, capsys):
    rows = scan(layout, "crema-d")
    assert "1076_MTI_NEU_XX" not in {r.key for r in rows}
    assert len(rows) == len(hl.CREMAD_CLIPS) - 1
    assert [(Path(s.path).name, s.key) for s in rows.skipped] == [("1076_MTI_NEU_XX", "1076_MTI_NEU_XX")]
    assert "broken" in rows.skipped[0].reason
    assert "skipped 1 clip" in capsys.readouterr().err


def test_folds_option_makes_speaker_independent_folds(layout, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    argv = ["hicmae", str(layout.lists / "crema-d"), "--out", str(out), "--folds", "5"]
    assert main([*argv, "--rewrite-root", f"{hl.AUTHORS_ROOT}={layout.root}"]) == 0, capsys.readouterr().err
    rows = read_manifest(out)
    folds_of_speaker: dict[str, set[int]] = {}
    for r in rows:
        folds_of_speaker.setdefault(r.speaker, set()).add(r.fold)
    assert len(folds_of_speaker) == 6 and "" not in folds_of_speaker
    assert all(len(f) == 1 for f in folds_of_speaker.values()), folds_of_speaker
    assert set(Counter(r.fold for r in rows)) == set(range(5))


@pytest.mark.parametrize(
    ("lists", "own_scan", "dataset_dir"),
    [
        ("crema-d", scan_cremad, "CREMA-D"),
        ("ravdess", scan_ravdess, "RAVDESS"),
        ("msp-improv", scan_msp_improv, "MSP-IMPROV"),
    ],
)
def test_keys_speakers_and_labels_equal_the_dataset_adapter(layout, lists, own_scan, dataset_dir):
    ours = {r.key: r for r in scan(layout, lists)}
    theirs = {r.key: r for r in own_scan(layout.root / dataset_dir)}
    broken = {"1076_MTI_NEU_XX"}
    assert set(ours) == set(theirs) - broken
    for key, r in ours.items():
        t = theirs[key]
        assert (r.speaker, r.label, r.label_name) == (t.speaker, t.label, t.label_name), key


def test_one_split_folder_keeps_train_and_test_membership(layout):
    for lists in ("crema-d/split01", "ravdess/split01"):
        folder = layout.lists / lists
        listed = {
            part: {
                line.split()[0].rsplit("/", 1)[1]
                for line in (folder / f"{part}.csv").read_text().splitlines()
            }
            for part in ("train", "test")
        }
        rows = scan(layout, lists)
        assert {r.split for r in rows} == {"train", "test"}
        for r in rows:
            assert r.fold is None, r.key
            assert Path(r.video).name in listed[r.split], (r.key, r.split)
        assert all(r.speaker and r.label_name for r in rows)


def test_msp_improv_val_lists_hold_out_a_session_like_test_lists(layout):
    rows = scan(layout, "msp-improv")
    assert len(rows) == len(hl.MSP_CLIPS)
    for r in rows:
        session = int(r.key.split("-")[2][1:3])  # MSP-IMPROV-S01A-...
        assert r.fold == session - 1, r.key
        assert r.speaker == r.key.split("-")[3]  # F01 / M01 names the actor
        assert r.label_name == ("anger", "happiness", "neutral", "sadness")[int(r.label)]


def test_a_list_label_that_contradicts_the_clip_name_is_an_error(layout, tmp_path):
    source = layout.lists / "crema-d" / "split01" / "test.csv"
    lines = source.read_text().splitlines()
    video, wav, label = lines[0].split()
    lines[0] = f"{video} {wav} {(int(label) + 1) % 6}"
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"test\.csv:1: .*ANG.* label"):
        scan_hicmae(tmp_path / "test.csv", rewrite_root=[f"{hl.AUTHORS_ROOT}={layout.root}"])


def test_a_clip_held_out_by_two_split_folders_is_an_error(layout, tmp_path):
    for k in (1, 2):
        folder = tmp_path / f"split0{k}"
        folder.mkdir()
        (folder / "test.csv").write_text((layout.lists / "crema-d" / "split01" / "test.csv").read_text())
    with pytest.raises(ManifestError, match=r"1001_DFA_ANG_XX is held out by the lists of split01, split02"):
        scan_hicmae(tmp_path, rewrite_root=[f"{hl.AUTHORS_ROOT}={layout.root}"])
