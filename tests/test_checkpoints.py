"""Checkpoints from elsewhere: weights-only loading, crafted pickles, damaged files."""

import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from metatrain import checkpoint, rng
from metatrain.errors import MetatrainError
from tests.conftest import TINY, make_cfg, run_cli


class CreatesAFile:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def crafted_checkpoint(path, target):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"iteration": 3, "learner": CreatesAFile(target)}, path)


def test_the_crafted_file_would_run_code_if_unpickled(tmp_path):
    # The test below means something only if this file really runs code when trusted.
    target = tmp_path / "created"
    crafted_checkpoint(tmp_path / "x.pt", target)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert target.exists()


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "created"
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    crafted_checkpoint(last, target)
    out = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'run'}", timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("metatrain: error:")]
    assert len(lines) == 1 and "asks to import posix.system" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not target.exists()
    assert last.exists()  # kept for the user to inspect


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_plain_pickle_is_refused_too(tmp_path, protocol):
    target = tmp_path / "created"
    path = tmp_path / "last.pt"
    path.write_bytes(pickle.dumps({"x": CreatesAFile(target)}, protocol=protocol))
    # Protocol 2 names the import it wants; newer protocols fail before reaching it.
    with pytest.raises(MetatrainError, match="refused without running it|unreadable"):
        checkpoint.load(path)
    assert not target.exists()


def test_rng_state_survives_a_weights_only_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    np.random.standard_normal(1)  # leaves a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save(rng.capture(generator), buf)
    draws = lambda: (
        random.random(),
        np.random.standard_normal(3).tolist(),
        torch.rand(2).tolist(),
        torch.rand(2, generator=generator).tolist(),
    )
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0), generator.manual_seed(0)
    buf.seek(0)
    rng.restore(torch.load(buf, weights_only=True), generator)
    assert draws() == expected


def test_finished_run_with_a_damaged_last_pt_stays_finished(tmp_path):
    cfg = make_cfg(*TINY)
    results = {"status": "finished", "test": {"acc": 50.0}, "config": None}
    results["config"] = checkpoint.config_fingerprint(cfg)
    (tmp_path / "results.json").write_text(json.dumps(results))
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"\x00truncated")
    out = run_cli(*TINY, f"hydra.run.dir={tmp_path}", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is finished" in out.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == results
    # Under another config the same directory is refused, naming the difference.
    out = run_cli(*TINY, "algorithm.inner_lr=0.1", f"hydra.run.dir={tmp_path}", timeout=600)
    assert out.returncode == 2 and "algorithm.inner_lr: 0.4 -> 0.1" in out.stderr


def test_written_files_honour_the_umask(tmp_path):
    from metatrain.files import save_json, save_torch

    old = os.umask(0o027)
    try:
        save_json({"a": 1}, tmp_path / "r.json")
        save_torch({"a": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
