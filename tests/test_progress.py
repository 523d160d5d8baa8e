"""The console during a run: progress lines captured through a pseudo-terminal at 80
and 160 columns, the plain lines off a terminal, and the line layout at any width."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from metatrain.progress import Meter, render

# A run's console without the training: the logger and the slow steps beside it.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from omegaconf import OmegaConf
    from metatrain.logging import RunLogger, activity, console

    log = RunLogger(OmegaConf.create({"logger": {"name": "none"}}), Path(sys.argv[1]), 0, 40)
    for i in range(1, 41):
        time.sleep(0.02)
        log.advance(i)
        if i % 10 == 0:
            log.log({"time/iter_s": 0.02, "train/loss": 1.234567, "train/acc": 45.6}, step=i)
        if i == 20:
            with activity("validation", 30, "tasks", announce=False) as step:
                for _ in range(3):
                    time.sleep(0.15)
                    step(10)
            log.log({"val/acc": 55.5, "val/acc_ci95": 1.25}, step=i)
    with activity("test", 30, "tasks") as step:
        for _ in range(3):
            time.sleep(0.15)
            step(10)
    log.log({"test/acc": 52.0, "test/acc_ci95": 5.8, "test/ensemble_acc_ci95": 5.8}, step=40)
    log.finish()
    console.print("done")
    """
)
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_pty(tmp_path, columns: int) -> list[str]:
    """The script's terminal output, control sequences removed, one entry per drawn line."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "CI")}
    env.update(COLUMNS=str(columns), TERM="xterm-256color")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = CSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    return [p for p in re.split(r"\r\n|\n|\r", text) if p.strip()]


@pytest.mark.parametrize("columns", [80, 160])
def test_progress_lines_fit_the_terminal_and_keep_results_apart(tmp_path, columns):
    lines = run_in_pty(tmp_path, columns)
    assert all(len(ln) <= columns for ln in lines), [ln for ln in lines if len(ln) > columns]
    train = [ln for ln in lines if ln.startswith("meta-train")]
    assert train and all(re.search(r" \d+/40 ", ln) for ln in train)
    # a rate and an ETA before the first log interval (iteration 10)
    early = [ln for ln in train if int(re.search(r" (\d+)/40 ", ln).group(1)) < 10]
    assert any(re.search(r"\d+\.\d+ it/s .*ETA 0:00:\d\d", ln) for ln in early), early
    assert any("loss 1.235" in ln and "acc 45.600" in ln for ln in train)
    # validation and test get lines of their own, and their numbers never enter the bar
    assert any(re.match(r"validation .*\d+/30 ", ln) for ln in lines)
    assert any(re.match(r"test .*\d+/30 ", ln) for ln in lines)
    assert "iteration 20: val/acc 55.50 ± 1.25" in lines
    assert not [ln for ln in train if "val/" in ln or "test/" in ln]
    assert lines[-1] == "done"


def test_off_a_terminal_one_plain_line_per_interval(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    )
    lines = out.stderr.splitlines()
    assert lines[0].startswith("iteration 10/40  train/loss=1.235  train/acc=45.600  50.00 it/s")
    assert "iteration 20: val/acc 55.50 ± 1.25" in lines
    assert "test: 30 tasks..." in lines  # the test announces itself; validation does not
    assert not any("validation" in ln or "━" in ln for ln in lines)


@pytest.mark.parametrize("width", [12, 30, 50, 80, 120, 160, 250])
def test_a_line_never_exceeds_the_width_and_drops_the_least_important_first(width):
    m = Meter(60000, 0)
    m.update(100, now=0.0)
    m.update(160, now=30.0)  # 2 it/s
    line = render("meta-train", m, "it", width, "loss 1.234  acc 45.600")
    assert len(line) <= width
    if width >= 80:
        assert "160/60000" in line and "2.00 it/s" in line and "ETA 8:18:40" in line
    if width >= 120:
        assert "loss 1.234" in line and "─" in line  # and the bar


def test_the_rate_leaves_out_start_up_and_shows_slow_runs_per_iteration():
    m = Meter(100, 0)
    assert m.rate() is None and m.eta() is None
    m.update(1, now=50.0)  # the first iteration, with its start-up, starts the clock
    assert m.rate() is None
    m.update(3, now=70.0)
    assert m.rate() == pytest.approx(0.1)
    assert "10.0 s/it" in render("meta-train", m, "it", 120)
