"""`emomae synth` progress: plain lines when stdout is not a terminal (a log file, a pipe), a tqdm bar
on a terminal, nothing from a library call of `generate`."""

from __future__ import annotations

import io
import re

import pytest

from data_pipelines.synth.progress import ClipProgress
from data_pipelines.synthetic import main

SMALL = ["num_speakers=2", "clips_per_speaker_class=1", "folds=2", "frame_size=32", "seconds=0.5"]
LINE = re.compile(r"^synth: (\d+)/12 clips \((\d+) %\), [\d.]+ clips/s(, \d+ s left)?$")


@pytest.mark.parametrize("workers", [1, 2])  # in this process, and from a pool of spawned processes
def test_synth_on_a_pipe_prints_a_plain_line_per_tenth_and_one_at_the_end(tmp_path, capsys, workers):
    assert main(["--out", str(tmp_path / "synth"), *SMALL, f"workers={workers}"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # no bar redrawn in place: a log keeps one line per report
    lines = [line for line in out.splitlines() if line.startswith("synth:")]
    counts = [int(LINE.match(line).group(1)) for line in lines]
    assert counts == [2, 4, 6, 8, 10, 12]  # 12 clips: a line every 2 (a tenth, rounded up)
    assert lines[-1].startswith("synth: 12/12 clips (100 %)") and "left" not in lines[-1]
    assert "s left" in lines[0]
    assert out.splitlines()[-1].startswith("wrote 12 clips")
    assert len(list((tmp_path / "synth" / "clips").glob("*.mp4"))) == 12


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_drawn_instead_of_lines():
    screen = Terminal()
    with ClipProgress(12, stream=screen) as bar:
        for _ in range(12):
            bar.update()
    drawn = screen.getvalue()
    assert "\r" in drawn and "12/12" in drawn and "clip/s" in drawn
    assert not re.search(r"^synth: \d+/12 clips \(", drawn, re.M)


def test_a_disabled_counter_prints_nothing():
    screen = Terminal()
    with ClipProgress(12, stream=screen, enabled=False) as bar:
        bar.update(12)
    pipe = io.StringIO()
    with ClipProgress(12, stream=pipe, enabled=False) as bar:
        bar.update(12)
    assert screen.getvalue() == pipe.getvalue() == ""
