"""Progress inside a round: the text, a live line on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import io

from fedbip_ray.runtime.progress import PhaseProgress, bar, progress_text


def test_text_has_counts_elapsed_and_an_estimate_once_a_call_finished():
    assert progress_text(3, 10, "fit", 0, 12, 5.0) == "round 3/10 fit 0/12 clients  5s"
    assert progress_text(3, 10, "fit", 4, 12, 40.0) == "round 3/10 fit 4/12 clients  40s  ~80s left"
    assert progress_text(3, 10, "fit", 12, 12, 90.0) == "round 3/10 fit 12/12 clients  90s"
    assert bar(5, 10, 10) == "[#####-----]" and bar(0, 0, 4) == "[####]"


def test_live_mode_redraws_one_line_and_clears_it_at_the_end():
    out = io.StringIO()
    p = PhaseProgress(5, out, live=True)
    p.start(1, "evaluate", 3)
    p.update(1)
    p.update(3)
    p.finish()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 4
    assert "round 1/5 evaluate 3/3 clients" in text and text.endswith("\r\033[K")


def test_plain_mode_prints_whole_lines_at_most_every_interval():
    out = io.StringIO()
    p = PhaseProgress(5, out, live=False, interval_s=0.0)  # every update is due
    p.start(2, "fit", 2)
    p.update(1)
    p.update(2)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("round 2/5 fit 1/2 clients") and "left" in lines[0]
    assert lines[1].startswith("round 2/5 fit 2/2 clients") and len(lines) == 3
    quiet = io.StringIO()
    q = PhaseProgress(5, quiet, live=False, interval_s=3600.0)
    q.start(1, "fit", 4)
    for i in range(1, 5):
        q.update(i)
    q.finish()
    assert quiet.getvalue() == ""  # a short phase prints nothing beyond the round line
