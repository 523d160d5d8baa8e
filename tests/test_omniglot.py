"""The real Omniglot set: reading, caching and the character split."""

import pytest
import torch

from metatrain.data import cache as cache_mod
from metatrain.data.omniglot import load_omniglot_images, split_omniglot
from metatrain.errors import MetatrainError


@pytest.fixture(scope="module")
def omniglot(omniglot_data):
    return load_omniglot_images(omniglot_data / "omniglot", 28, download=False)


def test_all_characters_and_drawings(omniglot):
    images, names = omniglot
    assert images.shape == (1623, 20, 1, 28, 28) and images.dtype == torch.uint8
    assert len(set(names)) == 1623
    assert sum(n.startswith("images_background/") for n in names) == 964
    # ink is bright on a dark background, and every drawing has some
    assert images.float().mean() < 64
    assert (images.flatten(2).amax(-1) > 128).all()


def test_split_sizes_disjoint_and_seeded(omniglot):
    images, names = omniglot
    s = split_omniglot(images, names, 0, 1100, 100, rotations=False)
    sizes = {k: len(v) for k, v in s.classes.items()}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    assert not set(s.classes["train"]) & set(s.classes["test"])
    assert not set(s.classes["val"]) & set(s.classes["test"])
    again = split_omniglot(images, names, 0, 1100, 100, rotations=False)
    assert again.classes == s.classes
    assert split_omniglot(images, names, 1, 1100, 100, False).classes["test"] != s.classes["test"]


def test_rotations_make_new_training_classes_only(omniglot):
    images, names = omniglot
    s = split_omniglot(images, names, 0, 1100, 100, rotations=True)
    assert s.images["train"].shape[0] == 4400 and s.images["test"].shape[0] == 423
    first = s.images["train"][0]
    torch.testing.assert_close(s.images["train"][1100], torch.rot90(first, 1, dims=(-2, -1)))


def test_cache_is_built_reused_and_rebuilt_when_stale(omniglot_data, tmp_path, monkeypatch):
    # A private copy of the zips, so staleness can be provoked.
    src = tmp_path / "omniglot" / "omniglot-py"
    src.mkdir(parents=True)
    for part in ("images_background.zip", "images_evaluation.zip"):
        (src / part).write_bytes((omniglot_data / "omniglot" / "omniglot-py" / part).read_bytes())
    images, _ = load_omniglot_images(tmp_path / "omniglot", 14, download=False)
    cache_file = src / "omniglot_14.pt"
    assert cache_file.exists() and images.shape == (1623, 20, 1, 14, 14)

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt although the cache is fresh")

    monkeypatch.setattr("metatrain.data.omniglot._build", no_rebuild)
    again, _ = load_omniglot_images(tmp_path / "omniglot", 14, download=False)
    assert torch.equal(images, again)
    # A corrupt cache file and a changed source both force a rebuild.
    cache_file.write_bytes(b"not a tensor file")
    assert cache_mod.load_cache(cache_file, []) is None
    with pytest.raises(AssertionError, match="rebuilt"):
        load_omniglot_images(tmp_path / "omniglot", 14, download=False)


def test_read_only_data_caches_elsewhere(omniglot_data, tmp_path, monkeypatch):
    monkeypatch.setenv("METATRAIN_CACHE", str(tmp_path / "cache"))
    path = cache_mod.cache_path(omniglot_data / "omniglot" / "omniglot-py", "x.pt")
    if cache_mod.is_writable_dir(omniglot_data / "omniglot" / "omniglot-py"):
        pytest.skip("the data folder is writable here")
    assert path.parent.parent == tmp_path / "cache"


def test_missing_data_names_the_path_and_urls(tmp_path):
    with pytest.raises(MetatrainError) as e:
        load_omniglot_images(tmp_path / "nowhere", 28, download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "images_background.zip" in msg
    assert "https://raw.githubusercontent.com/brendenlake/omniglot" in msg and "\n" not in msg


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(MetatrainError, match="download failed") as e:
        load_omniglot_images(tmp_path / "omni" / "data", 28, download=True)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no empty omni/data/omniglot-py/ left behind
