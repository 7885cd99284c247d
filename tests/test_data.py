"""The synthetic shapes dataset: deterministic, in range, held-out split disjoint, scorer reads it back."""

import collections

import pytest
import torch

from dit_fast.data import (ALL_COMBOS, COLORS, HELD_OUT, MOTIONS, SHAPES, TRAIN_COMBOS, VOCABULARY,
                           ShapesVideoDataset, caption_for, collate, parse_caption, score_clip)


def test_item_shape_range_and_determinism():
    ds = ShapesVideoDataset(num_frames=6, size=24, seed=7)
    a, b = ds[11], ShapesVideoDataset(num_frames=6, size=24, seed=7)[11]
    assert a["video"].shape == (3, 6, 24, 24) and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    assert a["video"].min() == -1 and a["video"].max() == 1  # black background, saturated object
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    other = ShapesVideoDataset(num_frames=6, size=24, seed=8)[11]
    assert not torch.equal(a["video"], other["video"])
    assert not torch.equal(ds[11]["video"], ds[12]["video"])


def test_splits_disjoint_and_cover_every_word_and_pair():
    assert set(HELD_OUT).isdisjoint(TRAIN_COMBOS)
    assert set(HELD_OUT) | set(TRAIN_COMBOS) == set(ALL_COMBOS)
    assert 0 < len(HELD_OUT) < len(ALL_COMBOS) // 4
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert {(c[a], c[b]) for c in TRAIN_COMBOS} == {(c[a], c[b]) for c in ALL_COMBOS}
    held = ShapesVideoDataset(split="heldout")
    train = ShapesVideoDataset(split="train")
    for i in range(60):
        assert tuple(held[i]["objects"][0]) in HELD_OUT
        assert tuple(train[i]["objects"][0]) in TRAIN_COMBOS


def test_caption_round_trip_and_vocabulary():
    for combo in ALL_COMBOS:
        cap = caption_for([combo])
        assert parse_caption(cap) == [combo]
        assert all(w in VOCABULARY for w in cap.split())
    two = caption_for([("red", "circle", "right"), ("blue", "square", "bouncing")])
    assert two == "a red circle moving right and a blue square bouncing"
    assert parse_caption(two) == [("red", "circle", "right"), ("blue", "square", "bouncing")]
    assert len(VOCABULARY) == len(set(VOCABULARY)) == 3 + len(COLORS) + len(SHAPES) + len(MOTIONS)


def test_unknown_word_lists_vocabulary():
    with pytest.raises(ValueError) as e:
        parse_caption("a purple circle moving right")
    msg = str(e.value)
    assert "purple" in msg and all(w in msg for w in VOCABULARY)
    with pytest.raises(ValueError, match="moving"):
        parse_caption("a red circle moving")
    with pytest.raises(ValueError, match="and"):
        parse_caption("a red circle bouncing a blue square bouncing")


def test_two_objects_and_collate():
    ds = ShapesVideoDataset(two_object_prob=1.0, seed=1)
    items = [ds[i] for i in range(4)]
    assert all(len(it["objects"]) == 2 and " and " in it["caption"] for it in items)
    batch = collate(items)
    assert batch["video"].shape == (4, 3, 8, 32, 32) and len(batch["caption"]) == 4


@pytest.mark.parametrize("size,frames", [(32, 8), (32, 16), (40, 12)])
def test_scorer_reads_ground_truth(size, frames):
    ds = ShapesVideoDataset(num_frames=frames, size=size, split="all", seed=size + frames)
    hits = collections.Counter()
    n = 150
    for i in range(n):
        it = ds[i]
        got = score_clip(it["video"])
        color, shape, motion = it["objects"][0]
        hits["color"] += got["color"] == color
        hits["shape"] += got["shape"] == shape
        hits["motion"] += got["motion"] == motion
    assert hits["color"] == n and hits["motion"] == n
    assert hits["shape"] >= 0.97 * n


def test_scorer_on_blank_and_noise():
    blank = -torch.ones(3, 8, 32, 32)
    assert score_clip(blank)["color"] is None and score_clip(blank)["motion"] is None
    with pytest.raises(ValueError):
        score_clip(torch.zeros(8, 32, 32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesVideoDataset(split="test")
    with pytest.raises(ValueError, match="num_frames"):
        ShapesVideoDataset(num_frames=1)
    with pytest.raises(IndexError):
        ShapesVideoDataset()[-1]
