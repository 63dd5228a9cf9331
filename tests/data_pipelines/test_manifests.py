"""Manifest adapters on directory trees built here with each dataset's official naming."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_pipelines.adapters import (
    scan_cremad,
    scan_dfew,
    scan_folder,
    scan_hicmae,
    scan_mafw,
    scan_msp_improv,
    scan_ravdess,
    scan_voxceleb2,
)
from data_pipelines.manifest_cli import main
from data_pipelines.manifests import (
    DATASETS,
    ManifestError,
    ManifestRow,
    dataset_info,
    read_manifest,
    speaker_folds,
    write_manifest,
)


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def assert_folds_partition_speakers(rows: list[ManifestRow], k: int) -> None:
    assert all(r.fold is not None and 0 <= r.fold < k for r in rows)
    fold_of: dict[str, set[int]] = {}
    for r in rows:
        fold_of.setdefault(r.speaker, set()).add(r.fold)
    assert all(len(f) == 1 for f in fold_of.values()), "a speaker is in two folds"
    assert len({r.key for r in rows}) == len(rows)


def test_cremad_labels_actors_blocks_and_audio_wav(tmp_path):
    actors = [1001, 1018, 1019, 1036, 1037, 1060, 1073, 1091]
    emotions = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    touch(tmp_path, *(f"VideoFlash/{a}_DFA_{e}_XX.flv" for a in actors for e in emotions))
    touch(tmp_path, "AudioWAV/1001_DFA_ANG_XX.wav", "VideoFlash/1001_DFA_ANG_XX.mp4", "VideoFlash/readme.txt")
    rows = scan_cremad(tmp_path)
    assert len(rows) == len(actors) * 6
    by_key = {r.key: r for r in rows}
    r = by_key["1001_DFA_ANG_XX"]
    assert Path(r.video).suffix == ".mp4" and r.audio.endswith(
        "AudioWAV/1001_DFA_ANG_XX.wav"
    )  # converted mp4 wins
    assert (r.label, r.label_name, r.speaker, r.fold) == ("0", "ANG", "1001", 0)
    assert by_key["1091_DFA_SAD_XX"].label == "5" and by_key["1091_DFA_SAD_XX"].audio == ""
    assert {a: by_key[f"{a}_DFA_NEU_XX"].fold for a in actors} == {
        1001: 0,
        1018: 0,
        1019: 1,
        1036: 1,
        1037: 2,
        1060: 3,
        1073: 4,
        1091: 4,
    }
    assert_folds_partition_speakers(rows, 5)


def test_ravdess_keeps_only_full_av_speech_and_folds_by_four_actors(tmp_path):
    names = []
    for actor in range(1, 25):
        for emo in range(1, 9):
            names.append(f"Actor_{actor:02d}/01-01-{emo:02d}-01-01-01-{actor:02d}.mp4")
        names += [
            f"Actor_{actor:02d}/02-01-03-01-01-01-{actor:02d}.mp4",  # video-only
            f"Actor_{actor:02d}/01-02-03-01-01-01-{actor:02d}.mp4",
        ]  # song
    touch(tmp_path, *names, "Actor_01/03-01-01-01-01-01-01.wav")
    rows = scan_ravdess(tmp_path)
    assert len(rows) == 24 * 8
    assert all(r.key.startswith("01-01-") for r in rows)
    r = next(r for r in rows if r.key == "01-01-08-01-01-01-05")
    assert (r.label, r.label_name, r.speaker, r.fold) == ("7", "surprised", "05", 1)
    assert Counter(r.fold for r in rows) == {f: 32 for f in range(6)}
    assert_folds_partition_speakers(rows, 6)


def test_voxceleb2_uses_the_id_folder_as_speaker(tmp_path):
    touch(
        tmp_path,
        "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4",
        "dev/mp4/id00012/21Uxsk56VDQ/00002.mp4",
        "dev/mp4/id00015/-0_aBc/00001.mp4",
        "test/mp4/id00017/xyz/00003.mp4",
        "dev/mp4/notes/a/b.mp4",
    )
    rows = scan_voxceleb2(tmp_path)
    assert [(r.key, r.speaker, r.split) for r in rows] == [
        ("id00012_21Uxsk56VDQ_00001", "id00012", "train"),
        ("id00012_21Uxsk56VDQ_00002", "id00012", "train"),
        ("id00015_-0_aBc_00001", "id00015", "train"),
        ("id00017_xyz_00003", "id00017", "test"),
    ]
    assert all(r.label == "" for r in rows)


def test_hicmae_lists_with_root_rewrite_give_folds_from_test_lists(tmp_path):
    data = tmp_path / "data"
    clips = [f"{a}_IEO_HAP_HI" for a in (1001, 1002, 1003, 1004)]
    for c in clips:
        (data / "frames" / c).mkdir(parents=True)
        touch(data, f"wav/{c}.wav")
    old = "/home/authors/CREMA-D"
    for k, test in ((1, clips[:2]), (2, clips[2:])):
        lists = tmp_path / "lists" / f"split0{k}"
        lists.mkdir(parents=True)
        train = [c for c in clips if c not in test]
        for name, part in (("train", train), ("val", test), ("test", test)):
            (lists / f"{name}.csv").write_text(
                "".join(f"{old}/frames/{c} {old}/wav/{c}.wav 3\n" for c in part)
            )
    with pytest.raises(ManifestError, match="--rewrite-root"):
        scan_hicmae(tmp_path / "lists")
    rows = scan_hicmae(tmp_path / "lists", rewrite_root=[f"{old}={data}"])
    assert sorted((r.key, r.fold, r.label) for r in rows) == [(c, i // 2, "3") for i, c in enumerate(clips)]
    assert all(Path(r.video).is_dir() and Path(r.audio).is_file() for r in rows)


def test_hicmae_single_list_set_gives_splits_and_regression_targets(tmp_path):
    touch(tmp_path, "v/a.mp4", "v/b.mp4", "w/a.wav", "w/b.wav")
    (tmp_path / "train.txt").write_text(f"{tmp_path}/v/a.mp4 {tmp_path}/w/a.wav 0.1 -0.5 0.25\n")
    (tmp_path / "test.txt").write_text(f"{tmp_path}/v/b.mp4 {tmp_path}/w/b.wav 1.0 2.0 3.0\n")
    rows = {r.key: r for r in scan_hicmae(tmp_path)}
    assert (rows["a"].split, rows["a"].label, rows["a"].fold) == ("train", "0.1 -0.5 0.25", None)
    assert rows["b"].split == "test"


def _write_dfew(root: Path, n: int = 10) -> None:
    for k in range(1, 6):
        test = [i for i in range(1, n + 1) if (i - 1) % 5 == k - 1]
        for part, ids in (("train", [i for i in range(1, n + 1) if i not in test]), ("test", test)):
            f = root / "EmoLabel_DataSplit" / f"{part}(single-labeled)" / f"set_{k}.csv"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("video_name,label\n" + "".join(f"{i},{(i % 7) + 1}\n" for i in ids))
    touch(root, *(f"Clip/clip_224x224/{i:05d}.mp4" for i in range(1, n + 1)))


def test_dfew_reads_official_set_files_and_zero_padded_clips(tmp_path):
    _write_dfew(tmp_path)
    rows = {r.key: r for r in scan_dfew(tmp_path)}
    assert len(rows) == 10
    r = rows["dfew_00007"]
    assert r.video.endswith("Clip/clip_224x224/00007.mp4")
    assert (r.fold, r.label, r.label_name) == (1, "0", "happy")  # label code 1 = happy; test list of set_2
    assert Counter(r.fold for r in rows.values()) == {f: 2 for f in range(5)}


def test_dfew_missing_split_file_is_named(tmp_path):
    _write_dfew(tmp_path)
    (tmp_path / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_3.csv").unlink()
    with pytest.raises(ManifestError, match=r"test\(single-labeled\)/set_3\.csv not found"):
        scan_dfew(tmp_path)


def test_mafw_reads_single_label_no_caption_sets(tmp_path):
    classes = DATASETS["mafw"].classes
    ids = list(range(1, 23))
    for k in range(1, 6):
        d = tmp_path / "Train & Test Set" / "single" / "no_caption" / f"set_{k}"
        d.mkdir(parents=True)
        test = [i for i in ids if i % 5 == k - 1]
        (d / "test.txt").write_text("".join(f"{i:05d}.mp4 {classes[i % 11]}\n" for i in test))
        (d / "train.txt").write_text(
            "".join(f"{i:05d}.mp4 {classes[i % 11]}\n" for i in ids if i not in test)
        )
    touch(tmp_path, *(f"data/clips/{i:05d}.mp4" for i in ids))
    rows = {r.key: r for r in scan_mafw(tmp_path)}
    assert len(rows) == 22
    assert (rows["mafw_00012"].fold, rows["mafw_00012"].label_name, rows["mafw_00012"].label) == (
        2,
        "disgust",
        "1",
    )
    (tmp_path / "data" / "clips" / "00012.mp4").unlink()
    with pytest.raises(ManifestError, match="1 clips of the split files have no video"):
        scan_mafw(tmp_path)


def test_msp_improv_uses_consensus_labels_and_sessions(tmp_path):
    lines, names = [], []
    for session in range(1, 7):
        for gender, label, scenario in (("F", "A", "P"), ("M", "H", "P"), ("F", "X", "R")):
            clip = f"S0{session}A-{gender}0{session}-{scenario}-FM0{session}"
            names += [
                f"session{session}/S0{session}A/P/MSP-IMPROV-{clip}.avi",
                f"session{session}/S0{session}A/P/MSP-IMPROV-{clip}.wav",
            ]
            lines.append(f"UTD-IMPROV-{clip}.avi; {label}; A:3.0; V:2.5; D:3.0 ; N:5.0;")
            lines.append("rater1; Angry; ; A:3; V:2; D:3; N:4;")
    touch(tmp_path, *names)
    with pytest.raises(ManifestError, match="Evaluation.txt not found"):
        scan_msp_improv(tmp_path)
    (tmp_path / "Evaluation.txt").write_text("\n".join(lines))
    rows = scan_msp_improv(tmp_path)
    assert len(rows) == 12  # X (no agreement) clips are left out
    r = next(r for r in rows if r.speaker == "M03")
    assert (r.label_name, r.label, r.fold) == ("happiness", "1", 2) and r.audio.endswith(".wav")
    assert_folds_partition_speakers(
        [ManifestRow(x.key, x.video, speaker=x.speaker[1:], fold=x.fold) for x in rows], 6
    )


def test_folder_is_recursive_with_optional_labels_from_parent(tmp_path):
    touch(tmp_path, "happy/a.mp4", "happy/sub/b.avi", "sad/a.mp4", "sad/notes.txt", "angry/x.MKV")
    rows = scan_folder(tmp_path)
    assert [r.key for r in rows] == ["angry-x", "happy-a", "happy-sub-b", "sad-a"]
    assert all(r.label == "" for r in rows)
    labelled = {r.key: (r.label, r.label_name) for r in scan_folder(tmp_path, labels_from_parent=True)}
    assert labelled == {
        "angry-x": ("0", "angry"),
        "happy-a": ("1", "happy"),
        "happy-sub-b": ("3", "sub"),
        "sad-a": ("2", "sad"),
    }


@pytest.mark.parametrize(
    ("scan", "message"),
    [
        (scan_cremad, "ActorID_Sentence_Emotion_Level.flv under .*CREMA-D expects"),
        (scan_ravdess, "01-01-EE-II-SS-RR-AA.mp4"),
        (scan_voxceleb2, "id\\*/VIDEO_ID/CLIP.mp4"),
        (scan_folder, "no video files"),
        (scan_mafw, "set_1/train.txt not found"),
    ],
)
def test_unknown_layout_says_what_was_expected(tmp_path, scan, message):
    touch(tmp_path, "random/file.txt")
    with pytest.raises(ManifestError, match=message):
        scan(tmp_path)


def test_speaker_folds_are_disjoint_cover_every_clip_once_and_balance_counts():
    speakers = [f"s{i}" for i in range(23) for _ in range(10 + (i % 4) * 5)]
    folds = speaker_folds(speakers, 5, seed=3)
    assert set(folds) == set(speakers)  # every speaker (so every clip) has exactly one fold
    sizes = Counter(folds[s] for s in speakers)
    assert sorted(sizes) == list(range(5))
    assert max(sizes.values()) - min(sizes.values()) <= 25  # at most one big speaker apart
    assert speaker_folds(speakers, 5, seed=3) == folds
    assert speaker_folds(speakers, 5, seed=4) != folds


def test_speaker_folds_need_enough_speakers_with_ids():
    with pytest.raises(ManifestError, match="3 speaker-independent folds from 2 speakers"):
        speaker_folds(["a", "b", "a"], 3)
    with pytest.raises(ManifestError, match="no speaker id"):
        speaker_folds(["a", ""], 2)


def test_cli_writes_a_manifest_that_reads_back_with_speaker_folds(tmp_path, capsys):
    touch(
        tmp_path,
        *(f"vox/id0{s}/vid{v}/0000{c}.mp4" for s in range(6) for v in range(2) for c in range(s + 1)),
    )
    out = tmp_path / "vox" / "manifest.csv"
    assert main(["voxceleb2", str(tmp_path / "vox"), "--out", str(out), "--folds", "3", "--seed", "1"]) == 0
    assert "wrote 42 clips" in capsys.readouterr().out
    with out.open() as f:
        raw = list(csv.DictReader(f))
    assert list(raw[0]) == [
        "key",
        "video",
        "audio",
        "label",
        "label_name",
        "speaker",
        "fold",
        "split",
        "bbox",
        "fps",
    ]
    assert not Path(raw[0]["video"]).is_absolute()  # relative to the manifest's folder
    rows = read_manifest(out)
    assert all(Path(r.video).is_file() for r in rows)
    assert_folds_partition_speakers(rows, 3)
    assert sorted(Counter(r.fold for r in rows).values()) == [14, 14, 14]


def test_cli_reports_an_unknown_dataset(tmp_path, capsys):
    assert main(["iemocap", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "unknown dataset 'iemocap'" in capsys.readouterr().err


def test_read_manifest_names_bad_keys_and_columns(tmp_path):
    (tmp_path / "m.csv").write_text("key,video\na.b,x.mp4\n")
    with pytest.raises(ManifestError, match=r"A-Za-z0-9_-.*a\.b"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("name,video\na,x.mp4\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['key'\]"):
        read_manifest(tmp_path / "m.csv")


def test_dataset_registry_has_the_paper_protocols():
    assert dataset_info("CREMA_D").classes == ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    assert dataset_info("ravdess").num_folds == 6 and len(dataset_info("RAVDESS").classes) == 8
    assert len(DATASETS["mafw"].classes) == 11 and DATASETS["dfew"].num_folds == 5
    assert DATASETS["msp-improv"].classes == ("anger", "happiness", "neutral", "sadness")


def test_every_registered_dataset_has_an_adapter_exported_by_name():
    import data_pipelines.adapters as adapters

    assert set(adapters.ADAPTERS) == set(DATASETS)
    for scan in adapters.ADAPTERS.values():
        assert getattr(adapters, scan.__name__) is scan and scan.__name__ in adapters.__all__


def test_adapters_import_on_their_own_without_a_circular_import():
    # the adapters import the manifest schema and `emomae manifest` imports both; importing an adapter
    # first must still work
    code = "import data_pipelines.adapters.hicmae as h, data_pipelines.manifest_cli as m; print(m.ADAPTERS['hicmae'] is h.scan_hicmae)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "True"), out.stderr


def test_fps_column_round_trips_and_may_be_absent_or_empty(tmp_path):
    rows = [ManifestRow("a", "frames/a", "a.wav", fps=29.97), ManifestRow("b", "b.mp4")]
    out = write_manifest(rows, tmp_path / "m.csv")
    assert [r.fps for r in read_manifest(out)] == [29.97, None]
    old = tmp_path / "old.csv"  # a manifest written before the column existed
    old.write_text("key,video,audio\nc,c.mp4,\n")
    assert read_manifest(old)[0].fps is None


@pytest.mark.parametrize("bad", ["fast", "0", "-25", "inf"])
def test_a_bad_fps_is_an_error_naming_the_line_and_key(tmp_path, bad):
    path = tmp_path / "m.csv"
    path.write_text(f"key,video,audio,fps\nclip1,frames/clip1,a.wav,{bad}\n")
    with pytest.raises(
        ManifestError, match=rf"m\.csv:2: fps of 'clip1' must be a positive number .*got '{bad}'"
    ):
        read_manifest(path)
