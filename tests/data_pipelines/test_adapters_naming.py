"""Dataset adapters and files that look like the dataset but break its naming scheme: counted, named
in the summary and in errors.jsonl lines, shown when nothing matches; unambiguous copies accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.adapters import scan_cremad, scan_msp_improv, scan_ravdess, scan_voxceleb2
from data_pipelines.manifests import ManifestError


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 16)


def skipped_names(rows) -> list[str]:
    return [Path(s.path).name for s in rows.skipped]


def test_cremad_counts_and_lists_files_off_the_naming_scheme(tmp_path, capsys):
    touch(
        tmp_path,
        "VideoFlash/1001_DFA_ANG_XX.flv",
        "VideoFlash/1002_IEO_HAP_HI.flv",
        "VideoFlash/1003_DFA_SAD_X.flv",  # one-letter level
        "VideoFlash/1004-DFA-NEU-XX.mp4",  # dashes
        "VideoFlash/readme.txt",  # not a video: not counted
    )
    rows = scan_cremad(tmp_path)
    assert sorted(r.key for r in rows) == ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI"]
    assert skipped_names(rows) == ["1003_DFA_SAD_X.flv", "1004-DFA-NEU-XX.mp4"]
    assert all("ActorID_Sentence_Emotion_Level" in s.reason for s in rows.skipped)
    err = capsys.readouterr().err
    assert (
        "CREMA-D: skipped 2 file(s)" in err and "1003_DFA_SAD_X.flv" in err and "1004-DFA-NEU-XX.mp4" in err
    )

    from data_pipelines.adapters.common import write_skipped  # here, so the tests above can fail alone

    lines = write_skipped(rows.skipped, tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [list(r) for r in records] == [["path", "key", "reason"]] * 2
    assert Path(records[0]["path"]) == tmp_path / "VideoFlash" / "1003_DFA_SAD_X.flv"


def test_summary_names_only_the_first_few_files(tmp_path, capsys):
    touch(tmp_path, "VideoFlash/1001_DFA_ANG_XX.flv", *(f"VideoFlash/clip{i}.mp4" for i in range(8)))
    rows = scan_cremad(tmp_path)
    assert len(rows.skipped) == 8
    err = capsys.readouterr().err
    assert "skipped 8 file(s)" in err and "clip4.mp4" in err and "clip5.mp4" not in err and "+3 more" in err


@pytest.mark.parametrize(
    ("scan", "names", "message"),
    [
        (scan_cremad, ["VideoFlash/1001-DFA-ANG-XX.mp4", "VideoFlash/take2.flv"], "found 2 other video file"),
        (scan_ravdess, ["Actor_01/01_01_03_01_01_01_01.mp4"], "found 1 other video file"),
        (scan_msp_improv, ["session1/S01A/P/MSP_IMPROV_S01A_F01_P_FM01.avi"], "found 1 other video file"),
    ],
)
def test_nothing_matching_shows_what_was_found(tmp_path, scan, names, message):
    touch(tmp_path, *names, "Evaluation.txt")
    with pytest.raises(ManifestError, match=message) as err:
        scan(tmp_path)
    assert Path(names[0]).name in str(err.value)


def test_an_empty_root_says_no_video_was_found(tmp_path):
    touch(tmp_path, "notes.txt")
    with pytest.raises(ManifestError, match="no video files were found"):
        scan_cremad(tmp_path)


def test_ravdess_copy_marks_name_the_same_clip_and_duplicates_are_counted(tmp_path, capsys):
    touch(
        tmp_path,
        "Actor_01/01-01-03-01-01-01-01_1.mp4",  # only a marked copy: used as the clip
        "Actor_01/01-01-04-01-01-01-01.mp4",  # the plain name wins over its copies
        "Actor_01/01-01-04-01-01-01-01_1.mp4",
        "Actor_01/01-01-04-01-01-01-01 (2).mp4",
        "Actor_02/01-01-05-01-01-01-02_2.mp4",  # the lowest copy number wins
        "Actor_02/01-01-05-01-01-01-02_1.mp4",
    )
    rows = {r.key: r for r in scan_ravdess(tmp_path)}
    assert sorted(rows) == ["01-01-03-01-01-01-01", "01-01-04-01-01-01-01", "01-01-05-01-01-01-02"]
    assert Path(rows["01-01-03-01-01-01-01"].video).name == "01-01-03-01-01-01-01_1.mp4"
    assert (rows["01-01-03-01-01-01-01"].speaker, rows["01-01-03-01-01-01-01"].label_name) == ("01", "happy")
    assert Path(rows["01-01-04-01-01-01-01"].video).name == "01-01-04-01-01-01-01.mp4"
    assert Path(rows["01-01-05-01-01-01-02"].video).name == "01-01-05-01-01-01-02_1.mp4"
    skipped = scan_ravdess(tmp_path).skipped
    assert sorted((Path(s.path).name, s.key) for s in skipped) == [
        ("01-01-04-01-01-01-01 (2).mp4", "01-01-04-01-01-01-01"),
        ("01-01-04-01-01-01-01_1.mp4", "01-01-04-01-01-01-01"),
        ("01-01-05-01-01-01-02_2.mp4", "01-01-05-01-01-01-02"),
    ]
    assert all("another copy" in s.reason for s in skipped)
    assert "RAVDESS: skipped 3 file(s)" in capsys.readouterr().err


def test_one_clip_in_two_formats_is_no_duplicate(tmp_path):
    touch(tmp_path, "VideoFlash/1001_DFA_ANG_XX.flv", "VideoFlash/1001_DFA_ANG_XX.mp4")
    rows = scan_cremad(tmp_path)
    assert [Path(r.video).name for r in rows] == ["1001_DFA_ANG_XX.mp4"] and rows.skipped == []


def test_msp_improv_counts_files_off_the_naming_scheme(tmp_path):
    clip = "S01A-F01-P-FM01"
    touch(tmp_path, f"session1/S01A/P/MSP-IMPROV-{clip}.avi", "session1/S01A/P/MSP-IMPROV-S01A-F1-P-FM01.avi")
    (tmp_path / "Evaluation.txt").write_text(f"UTD-IMPROV-{clip}.avi; A; A:3.0; V:2.5; D:3.0 ; N:5.0;\n")
    rows = scan_msp_improv(tmp_path)
    assert [r.key for r in rows] == [f"MSP-IMPROV-{clip}"]
    assert skipped_names(rows) == ["MSP-IMPROV-S01A-F1-P-FM01.avi"]


def test_voxceleb2_counts_mp4_files_outside_the_speaker_video_clip_layout(tmp_path, capsys):
    touch(
        tmp_path,
        "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4",
        "dev/mp4/notes/a/b.mp4",
        "dev/mp4/id00012/loose.mp4",
    )
    rows = scan_voxceleb2(tmp_path)
    assert [r.key for r in rows] == ["id00012_21Uxsk56VDQ_00001"]
    assert sorted(skipped_names(rows)) == ["b.mp4", "loose.mp4"]
    assert "VoxCeleb2: skipped 2 file(s)" in capsys.readouterr().err
    (tmp_path / "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4").unlink()
    with pytest.raises(ManifestError, match="found 2 other video file"):
        scan_voxceleb2(tmp_path)


def test_emomae_manifest_writes_the_skipped_files_beside_the_manifest(tmp_path, capsys):
    from data_pipelines.manifest_cli import main

    touch(tmp_path / "data", "VideoFlash/1001_DFA_ANG_XX.flv", "VideoFlash/1003_DFA_SAD_X.flv")
    out = tmp_path / "out" / "manifest.csv"
    assert main(["crema_d", str(tmp_path / "data"), "--out", str(out)]) == 0
    records = [json.loads(x) for x in (out.parent / "errors.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in records] == ["1003_DFA_SAD_X.flv"]
    assert "skipped files listed in" in capsys.readouterr().out
    (tmp_path / "data" / "VideoFlash" / "1003_DFA_SAD_X.flv").unlink()  # a clean rescan leaves no stale list
    assert main(["crema_d", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert not (out.parent / "errors.jsonl").exists()
