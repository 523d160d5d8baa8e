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


def marked_images(classes=12, per_class=20):
    """3x3 images whose rotation can be read back without the sampler: the centre
    holds the class and the four edge midpoints the image index (both unchanged by
    quarter turns), and one corner is lit, so where it ends up tells the turn."""
    img = torch.zeros(classes, per_class, 1, 3, 3, dtype=torch.uint8)
    img[..., 0, 1, 1] = torch.arange(classes, dtype=torch.uint8)[:, None]
    for r, c in ((0, 1), (1, 0), (1, 2), (2, 1)):
        img[..., 0, r, c] = torch.arange(per_class, dtype=torch.uint8)
    img[..., 0, 0, 0] = 255
    return img


def read_marks(x):
    """(class, index, quarter turns) of each image of x (..., 1, 3, 3)."""
    raw = (x * 255).round().long()[..., 0, :, :]
    corner = torch.zeros(3, 3, dtype=torch.long)
    corner[0, 0] = 1
    turns = torch.full(raw.shape[:-2], -1, dtype=torch.long)
    for k in range(4):
        r, c = divmod(int(torch.rot90(corner, k).argmax()), 3)
        turns[raw[..., r, c] == 255] = k
    return raw[..., 1, 1], raw[..., 0, 1], turns


def test_rotation_is_shared_by_a_class_within_a_task_and_drawn_per_task():
    s = EpisodeSampler(marked_images(), ways=5, shots=2, queries=3, mean=[0.0], std=[1.0])
    s.rotate = True
    b = s.sample(2000, torch.Generator().manual_seed(0))
    _, _, ks = read_marks(b.xs)
    _, _, kq = read_marks(b.xq)
    assert (ks >= 0).all() and (kq >= 0).all()  # every image is a quarter turn of its class
    per_class = torch.cat([ks.view(2000, 5, 2), kq.view(2000, 5, 3)], dim=2)  # (tasks, ways, 5)
    assert (per_class == per_class[..., :1]).all()  # one turn for all of a class's images
    turn = per_class[..., 0]  # (tasks, ways)
    freq = torch.bincount(turn.flatten(), minlength=4).double() / turn.numel()
    # 10,000 draws: each frequency within ~6 standard deviations (0.0043) of 1/4
    assert (freq - 0.25).abs().max() < 0.025, freq
    # classes of one task turn independently: two of them agree a quarter of the time
    agree = (turn[:, 0] == turn[:, 1]).double().mean()
    assert abs(agree - 0.25) < 0.06, agree
    # and the same class is turned differently in different tasks
    assert len(set(turn[:, 0].tolist())) == 4


def test_rotation_never_reaches_evaluation_tasks():
    s = EpisodeSampler(marked_images(), ways=5, shots=1, queries=4, mean=[0.0], std=[1.0])
    s.rotate = True
    for b in FixedTasks(s, 300, seed=3).batches(100):
        assert (read_marks(b.xs)[2] == 0).all() and (read_marks(b.xq)[2] == 0).all()
    s.rotate = False
    b = s.sample(300, torch.Generator().manual_seed(0))
    assert (read_marks(b.xs)[2] == 0).all()


def test_rotated_batch_equals_rot90_of_the_gathered_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 20, 2, 28, 28), generator=g, dtype=torch.uint8)
    mean, std = [0.2, 0.5], [0.3, 0.25]
    s = EpisodeSampler(images, ways=4, shots=3, queries=2, mean=mean, std=std, rotate=True)
    b = s.sample(6, torch.Generator().manual_seed(5))
    # the same draws, replayed from the same seed, rotated and normalised by hand
    replay = torch.Generator().manual_seed(5)
    cls, ids = s.draw(6, replay)
    rot = s.draw_rotations(6, replay)
    m, sd = torch.tensor(mean).view(2, 1, 1), torch.tensor(std).view(2, 1, 1)
    for t in range(6):
        for j in range(4):
            for i in range(5):
                img = torch.rot90(images[cls[t, j], ids[t, j, i]], int(rot[t, j]), dims=(-2, -1))
                want = (img.float() / 255 - m) / sd
                got = b.xs[t, j * 3 + i] if i < 3 else b.xq[t, j * 2 + i - 3]
                torch.testing.assert_close(got, want)
    assert rot.unique().numel() > 1


def test_rotation_needs_square_images():
    with pytest.raises(MetatrainError, match="square"):
        EpisodeSampler(
            torch.zeros(5, 4, 1, 3, 4, dtype=torch.uint8), 2, 1, 1, [0.0], [1.0], rotate=True
        )
