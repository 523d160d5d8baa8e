"""Episode sampling by tensor indexing."""

import pytest
import torch

from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.errors import MetatrainError


def labelled_images(classes=30, per_class=20):
    # pixel value encodes (class, index) so gathered images can be traced back
    ids = torch.arange(classes * per_class, dtype=torch.int64).view(classes, per_class)
    img = torch.zeros(classes, per_class, 1, 2, 2, dtype=torch.uint8)
    img[..., 0, 0, 0] = (ids // per_class).to(torch.uint8)
    img[..., 0, 0, 1] = (ids % per_class).to(torch.uint8)
    return img


def decode(x):
    raw = (x * 255).round().long()  # mean 0, std 1: x = pixel / 255
    return raw[..., 0, 0, 0], raw[..., 0, 0, 1]


def test_shapes_labels_and_disjoint_support_query():
    s = EpisodeSampler(labelled_images(), ways=5, shots=2, queries=3, mean=[0.0], std=[1.0])
    b = s.sample(7, torch.Generator().manual_seed(0))
    assert b.xs.shape == (7, 10, 1, 2, 2) and b.xq.shape == (7, 15, 1, 2, 2)
    assert b.xs.dtype == torch.float32
    assert torch.equal(b.ys[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    cs, is_ = decode(b.xs)
    cq, iq = decode(b.xq)
    for t in range(7):
        # every example of label j comes from one class, the same in support and query
        for j in range(5):
            cls = cs[t][b.ys[t] == j]
            assert (cls == cls[0]).all() and (cq[t][b.yq[t] == j] == cls[0]).all()
        assert len(set(cs[t].tolist())) == 5
        support = set(zip(cs[t].tolist(), is_[t].tolist()))
        query = set(zip(cq[t].tolist(), iq[t].tolist()))
        assert len(support) == 10 and len(query) == 15 and not support & query


def test_labels_are_permuted_across_tasks():
    s = EpisodeSampler(labelled_images(), ways=5, shots=1, queries=1, mean=[0.0], std=[1.0])
    b = s.sample(50, torch.Generator().manual_seed(1))
    first_class = decode(b.xs)[0][:, 0]  # the class behind label 0 in each task
    assert len(set(first_class.tolist())) > 10


def test_normalisation_per_channel():
    img = torch.full((5, 4, 3, 2, 2), 255, dtype=torch.uint8)
    s = EpisodeSampler(img, 2, 1, 1, mean=[0.5, 0.0, 1.0], std=[0.5, 1.0, 2.0])
    b = s.sample(1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.xs[0, 0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_fixed_tasks_are_reproducible_and_batched():
    s = EpisodeSampler(labelled_images(), 5, 1, 2, [0.0], [1.0])
    a, b = FixedTasks(s, 23, seed=7), FixedTasks(s, 23, seed=7)
    xa = torch.cat([t.xq for t in a.batches(10)])
    xb = torch.cat([t.xq for t in b.batches(23)])
    assert xa.shape[0] == 23 and torch.equal(xa, xb)
    other = torch.cat([t.xq for t in FixedTasks(s, 23, seed=8).batches(23)])
    assert not torch.equal(xa, other)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"ways": 31}, "exceeds the 30 classes"),
        ({"shots": 0}, "at least 1 support"),
        ({"shots": 15, "queries": 6}, "exceeds the 20 images per class"),
        ({"ways": 1}, "at least 2 classes"),
    ],
)
def test_impossible_settings(kw, message):
    args = {"ways": 5, "shots": 1, "queries": 1, **kw}
    with pytest.raises(MetatrainError, match=message):
        EpisodeSampler(labelled_images(), mean=[0.0], std=[1.0], **args)
