"""The authors' Omniglot pipeline for Reptile: preprocessing, character split, no
validation split, and the former spelling of transductive evaluation."""

import io
import random
import zipfile

import numpy as np
import pytest
from PIL import Image

from metatrain.data.omniglot import PARTS, _decode, python_shuffle_order, split_omniglot
from metatrain.errors import MetatrainError
from metatrain.inert import inert_settings
from tests.conftest import TINY, make_cfg


def one_bit_png(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.random((105, 105)) > 0.3).convert("1")  # mode '1' as Omniglot
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_nearest_uninverted_decode_is_pils_default_resize_of_the_1bit_image():
    png = one_bit_png()
    # supervised-reptile: Image.open(f).resize((28, 28)), then np.array(...) of mode '1'
    want = np.array(Image.open(io.BytesIO(png)).resize((28, 28))).astype(np.uint8) * 255
    got = _decode(png, 28, "nearest", invert=False)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 255}
    np.testing.assert_array_equal(got, want)
    # the default stays MAML's: LANCZOS grey levels, inverted
    lanczos = _decode(png, 28)
    assert len(np.unique(lanczos)) > 2
    np.testing.assert_array_equal(
        lanczos,
        255 - np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.LANCZOS)),
    )


def test_python_shuffle_is_the_reptile_authors_character_order(omniglot_data):
    # Their listing, rebuilt from the zips: every alphabet of both parts in one sorted
    # listing, characters sorted within it, then random.seed(0); random.shuffle.
    chars = set()
    for part in PARTS:
        with zipfile.ZipFile(omniglot_data / "omniglot" / "omniglot-py" / f"{part}.zip") as z:
            for n in z.namelist():
                if n.endswith(".png"):
                    alphabet, character = n.split("/")[-3:-1]
                    chars.add((part, alphabet, character))
    theirs = sorted((a, c) for _, a, c in chars)
    random.seed(0)
    random.shuffle(theirs)
    names = sorted(f"{p}/{a}/{c}" for p, a, c in chars)  # our cache's order
    order = python_shuffle_order(names, 0).tolist()
    assert len(theirs) == 1623
    assert [tuple(names[i].split("/")[1:]) for i in order] == theirs


def test_no_validation_split():
    import torch

    images = torch.zeros(30, 20, 1, 4, 4, dtype=torch.uint8)
    names = [f"p/a{i // 10}/c{i % 10:02d}" for i in range(30)]
    out = split_omniglot(images, names, 0, 20, 0, rotations=False, shuffle="python")
    assert out.images["val"].shape[0] == 0 and out.images["test"].shape[0] == 10
    assert set(out.classes["train"]) | set(out.classes["test"]) == set(names)


def test_a_split_without_validation_needs_the_last_parameters(omniglot_data, tmp_path):
    from metatrain.train import train

    cfg = make_cfg(*TINY, "dataset.val_classes=0", "eval.test_from=best")
    with pytest.raises(MetatrainError, match="eval.test_from=last"):
        train(cfg, tmp_path)


def test_former_spelling_batch_is_transductive_with_a_notice():
    old = make_cfg("model.bn_eval=batch")
    assert any("now spelled model.bn_eval=transductive" in line for line in inert_settings(old))
    assert not any("bn_eval" in line for line in inert_settings(make_cfg()))
    from metatrain.naming import bn_mode

    assert bn_mode(old) == bn_mode(make_cfg()) == "transductive"


@pytest.mark.slow
def test_reptile_without_validation_trains_and_tests_the_last_parameters(omniglot_data, tmp_path):
    import json

    from metatrain.train import train

    cfg = make_cfg(
        *TINY, "experiment=reptile_omniglot_5w1s", "train.iterations=6", "train.log_interval=3",
        "algorithm.eval_iters=3", "eval.test_tasks=10", "model.filters=8", "logger=none",
    )  # fmt: skip
    results = train(cfg, tmp_path)
    assert results["best_val"] is None and results["test"]["members"] == ["last"]
    assert results["test"]["bn_eval"] == "support_plus_query"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("val/acc" in r for r in rows)
