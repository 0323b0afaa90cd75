"""The run's progress bar: drawn in a pseudo-terminal that reports 0 x 0 (tqdm hid it there), and no
ETA until it can be estimated from aggregations measured after the first window (no Ray)."""
from __future__ import annotations

import os
import pty

from fedray.runtime.progress import eta, make_bar


def test_bar_is_drawn_in_a_pty_without_a_size():
    master, slave = pty.openpty()
    try:
        assert tuple(os.get_terminal_size(slave)) == (0, 0)
        with os.fdopen(os.dup(slave), "w", encoding="utf-8") as tty:
            bar = make_bar(10, "fedavg s0", "agg", file=tty, mininterval=0)
            for _ in range(3):
                bar.update(1)
            bar.close()
        os.close(slave)
        slave = None
        chunks = []
        while True:  # everything written, until the closed terminal side reads as EIO
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = b"".join(chunks).decode()
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    last = [seg for seg in out.replace("\r\n", "\r").split("\r") if seg.startswith("fedavg s0:")][-1]
    assert last.startswith("fedavg s0:  30%|") and "| 3/10 [" in last
    assert len(last) <= 80


def test_no_eta_during_the_first_window():
    assert eta(None, 0, 10, 5.0) == "--"            # nothing finished yet
    assert eta((10.0, 2), 2, 10, 30.0) == "--"      # only the first window (setup + first dispatches)
    assert eta((10.0, 2), 4, 10, 14.0) == "00:12"   # 2 aggregations in 4 s, 6 left
    assert eta((10.0, 2), 10, 10, 20.0) == "00:00"
    bar = make_bar(10, "x", "agg", mininterval=0)
    try:
        bar.update(3)  # the first window may close several versions at once
        assert "ETA --" in str(bar) and "?" not in str(bar)
        assert bar.mark[1] == 3
    finally:
        bar.close()


def test_disabled_bar_counts_quietly():
    bar = make_bar(4, "x", "run", disable=True)
    bar.update(1)
    bar.close()
    assert bar.mark is None
