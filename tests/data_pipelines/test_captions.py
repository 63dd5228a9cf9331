"""Caption files, captions written with shards, and merged into existing shards byte for byte."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from data_pipelines.adapters import scan_folder
from data_pipelines.captions import CaptionError, load_captions, main
from data_pipelines.manifests import write_manifest
from data_pipelines.shards import ShardConfig, write_shards

CFG = ShardConfig(num_frames=2, frame_stride=4, img_size=16, max_windows=2, samples_per_shard=4)


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture()
def shards(realdata_dir, tmp_path) -> Path:
    rows = scan_folder(realdata_dir / "grid_lipnet")[:3]  # 3 s clips: 2 windows each
    manifest = write_manifest(rows, tmp_path / "m.csv")
    write_shards(manifest, tmp_path / "shards", CFG, progress=False)
    return tmp_path / "shards"


def test_csv_and_jsonl_captions_load_by_key(tmp_path):
    (tmp_path / "c.csv").write_text('key,caption\na,"calm voice, slight smile"\nb,\n')
    assert load_captions(tmp_path / "c.csv") == {"a": "calm voice, slight smile"}
    (tmp_path / "c.jsonl").write_text(
        '{"key": "a", "text": "tense jaw"}\n\n{"key": "b", "caption": "laughs"}\n'
    )
    assert load_captions(tmp_path / "c.jsonl") == {"a": "tense jaw", "b": "laughs"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.csv", "id,caption\na,x\n", "'key' and 'caption'"),
        ("c.jsonl", '{"key": "a"}\n', r"c\.jsonl:1"),
        ("c.jsonl", "not json\n", r"c\.jsonl:1: not a JSON"),
        ("c.csv", "key,text\na,x\na,y\n", "two different captions"),
        ("c.txt", "a x\n", r"\.csv"),
    ],
)
def test_bad_caption_files_name_the_file_and_the_problem(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(CaptionError, match=message):
        load_captions(tmp_path / name)


def test_captions_given_to_the_writer_go_into_every_window_of_the_clip(realdata_dir, tmp_path):
    rows = scan_folder(realdata_dir / "grid_lipnet")[:2]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    caps = tmp_path / "c.jsonl"
    caps.write_text(json.dumps({"key": rows[0].key, "caption": "a neutral read sentence"}) + "\n")
    index = write_shards(manifest, tmp_path / "s", CFG, captions=caps, progress=False)
    got = members(tmp_path / "s" / "all-000000.tar")
    assert got[f"{rows[0].key}_w000.txt"] == got[f"{rows[0].key}_w001.txt"] == b"a neutral read sentence"
    assert not any(n.startswith(rows[1].key) and n.endswith(".txt") for n in got)
    assert index["totals"]["captions"] == 2


def test_merge_adds_captions_without_changing_media_bytes(shards, tmp_path, capsys):
    before = members(shards / "all-000000.tar")
    clip_keys = sorted({json.loads(v)["clip_key"] for n, v in before.items() if n.endswith(".json")})
    caps = tmp_path / "c.csv"
    caps.write_text(f"key,caption\n{clip_keys[0]},first clip\n{clip_keys[1]}_w001,second clip window 1\n")
    assert main([str(shards), str(caps)]) == 0
    assert "captioned 3 of 6 samples" in capsys.readouterr().out
    after = members(shards / "all-000000.tar")
    assert {n: v for n, v in after.items() if not n.endswith(".txt")} == before
    assert after[f"{clip_keys[0]}_w000.txt"] == after[f"{clip_keys[0]}_w001.txt"] == b"first clip"
    assert after[f"{clip_keys[1]}_w001.txt"] == b"second clip window 1"
    assert f"{clip_keys[1]}_w000.txt" not in after
    index = json.loads((shards / "index.json").read_text())
    assert index["totals"]["captions"] == 3 and sum(s["captions"] for s in index["shards"]) == 3
    # Members of a sample stay together: WebDataset groups consecutive members by key.
    with tarfile.open(shards / "all-000000.tar") as tar:
        keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs))


def test_merge_replaces_an_old_caption_and_keeps_the_rest(shards, tmp_path):
    first = tmp_path / "a.jsonl"
    key = next(n for n in members(shards / "all-000000.tar") if n.endswith(".json")).split("_w")[0]
    first.write_text(json.dumps({"key": key, "caption": "old"}) + "\n")
    assert main([str(shards), str(first)]) == 0
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps({"key": f"{key}_w001", "caption": "new"}) + "\n")
    assert main([str(shards), str(second)]) == 0
    got = members(shards / "all-000000.tar")
    assert got[f"{key}_w000.txt"] == b"old" and got[f"{key}_w001.txt"] == b"new"


def test_merge_into_another_folder_leaves_the_source_untouched(shards, tmp_path):
    before = members(shards / "all-000000.tar")
    key = next(n for n in before if n.endswith(".json")).split("_w")[0]
    (tmp_path / "c.csv").write_text(f"key,text\n{key},hello\n")
    assert main([str(shards), str(tmp_path / "c.csv"), "--out", str(tmp_path / "captioned")]) == 0
    assert members(shards / "all-000000.tar") == before
    assert members(tmp_path / "captioned" / "all-000000.tar")[f"{key}_w000.txt"] == b"hello"
    assert (tmp_path / "captioned" / "provenance.json").is_file()
    assert json.loads((tmp_path / "captioned" / "index.json").read_text())["totals"]["captions"] == 2


def test_merge_into_a_folder_without_index_is_an_error(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("key,caption\na,b\n")
    assert main([str(tmp_path), str(tmp_path / "c.csv")]) == 2
    assert "index.json" in capsys.readouterr().err
