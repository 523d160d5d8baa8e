"""A full disk (ENOSPC) while writing any run file: one line naming the file and the
last intact checkpoint, exit code 2, the checkpoint on disk untouched. The disk is
faked: the write of the chosen file raises OSError(ENOSPC) as a full one would."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metatrain import files, metrics
from metatrain.errors import DiskFull, MetatrainError
from metatrain.train import train
from tests.conftest import make_cfg

ARGS = [
    "logger=none", "model.filters=4", "algorithm.meta_batch=2", "dataset.queries=1",
    "train.iterations=8", "train.log_interval=2", "train.val_interval=4",
    "train.checkpoint_interval=4", "train.keep_best=1", "eval.val_tasks=2", "eval.test_tasks=2",
]  # fmt: skip


def fill_disk_at(monkeypatch, name: str, after: int = 0):
    """Make the (after+1)-th atomic write of a file whose name starts with `name` fail
    with ENOSPC, at fsync (where a full disk shows up for buffered writes)."""
    seen = {"n": 0}
    real = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(target).startswith(f".{name}"):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


@pytest.mark.parametrize(
    "name, after, intact",
    [
        ("last.pt", 1, 4),  # the second save (iteration 8) fails: iteration 4's stays
        ("last.pt", 0, None),  # the first save fails: none was saved
        ("best-", 0, None),  # the first validation's best checkpoint, before any last.pt
        ("results.json", 0, 8),  # at the end: last.pt of the final iteration is intact
    ],
)
def test_a_full_disk_names_the_file_and_the_last_intact_checkpoint(
    omniglot_data, tmp_path, monkeypatch, name, after, intact
):
    fill_disk_at(monkeypatch, name, after)
    with pytest.raises(MetatrainError) as e:
        train(make_cfg(*ARGS), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "no space left on the device while writing" in msg
    assert f"{tmp_path}/" in msg and name in msg.split("writing ")[1].split(";")[0]
    last = tmp_path / "checkpoints" / "last.pt"
    if intact is None:
        assert "no checkpoint was saved yet" in msg and not last.exists()
    else:
        assert f"the last intact checkpoint is {last} (iteration {intact})" in msg
        assert torch.load(last, weights_only=True)["iteration"] == intact
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # no temp file left
    assert not (tmp_path / "results.json").exists()


class FullAfter:
    """metrics.jsonl's file object on a disk that fills after `rows` rows."""

    def __init__(self, f, rows: int):
        self.f, self.rows = f, rows

    def write(self, text):
        self.rows -= 1
        return self.f.write(text)

    def flush(self):
        if self.rows < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.f.flush()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_while_logging_metrics(omniglot_data, tmp_path, monkeypatch):
    real_init = metrics.MetricsFile.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.file = FullAfter(self.file, rows=4)  # rows of iterations 2, 4 (+val), 6

    monkeypatch.setattr(metrics.MetricsFile, "__init__", init)
    with pytest.raises(MetatrainError) as e:
        train(make_cfg(*ARGS), tmp_path)
    assert f"writing {tmp_path / 'metrics.jsonl'}; the last intact checkpoint is" in str(e.value)
    assert "(iteration 4)" in str(e.value)


def test_a_full_disk_while_a_resume_trims_metrics_jsonl(omniglot_data, tmp_path, monkeypatch):
    cfg = make_cfg(*ARGS)
    with pytest.raises(MetatrainError):  # a first session stopped after iteration 4's save
        fill_disk_at(monkeypatch, "last.pt", after=1)
        train(cfg, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    assert b'"iteration": 6' in before  # rows past the checkpoint, which a resume trims
    monkeypatch.undo()
    fill_disk_at(monkeypatch, "metrics.jsonl")
    with pytest.raises(MetatrainError) as e:
        train(cfg, tmp_path)
    assert str(e.value) == (
        f"no space left on the device while writing {tmp_path}/metrics.jsonl; the last "
        f"intact checkpoint is {tmp_path}/checkpoints/last.pt (iteration 4): free some "
        "space, then run the same command again to resume"
    )
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # untouched
    assert not list(tmp_path.glob(".metrics*"))  # no temp file left
    monkeypatch.undo()  # room again: the same command resumes and finishes
    assert train(cfg, tmp_path)["iterations"] == 8


def test_torchs_own_write_error_counts_when_the_disk_is_full(tmp_path, monkeypatch):
    err = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 512 vs 448")
    assert not files.out_of_space(err, tmp_path)  # this disk has room

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(files.os, "statvfs", lambda _: Full)
    assert files.out_of_space(err, tmp_path)
    assert not files.out_of_space(ValueError("write"), tmp_path)
    assert files.out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))


def test_the_cli_answers_with_one_line_and_exit_code_2(omniglot_data, tmp_path):
    script = textwrap.dedent(
        f"""
        import errno, os, sys
        real = os.fsync
        def fsync(fd):
            if "results.json" in os.readlink(f"/proc/self/fd/{{fd}}"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        os.fsync = fsync
        sys.argv = ["metatrain", *{ARGS!r}, "hydra.run.dir={tmp_path}"]
        from metatrain.cli import main
        main()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("metatrain: error:")]
    assert errors == [
        (
            f"metatrain: error: no space left on the device while writing {tmp_path}/results.json; "
            f"the last intact checkpoint is {tmp_path}/checkpoints/last.pt (iteration 8): "
            "free some space, then run the same command again to resume"
        )
    ]
    assert "Traceback" not in out.stderr
    assert errors[0] in (tmp_path / "cli.log").read_text()


def test_disk_full_is_a_user_error():
    assert issubclass(DiskFull, MetatrainError)
