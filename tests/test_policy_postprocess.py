"""Post-processing: component and hole sizes against a breadth-first flood fill written here, the rules (strict
"smaller than", fallback classes, border holes kept, class order) on hand-drawn maps and, written out with that flood
fill, on random ones; inside the decision policy, after the rule, with fallbacks ranked by q."""

from collections import deque

import numpy as np
import pytest

from segtrain.policy.postprocess import (component_sizes, fill_holes, hole_sizes, postprocess, remove_small,
                                  second_choice)

EIGHT_STEPS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
FOUR_STEPS = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def flood_sizes(mask, steps):
    """Per pixel of mask, the size of its component under `steps` (BFS), 0 outside; also whether it touches the
    border."""
    h, w = mask.shape
    sizes = np.zeros(mask.shape, np.int64)
    border = np.zeros(mask.shape, bool)
    seen = np.zeros(mask.shape, bool)
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            queue, members = deque([(y0, x0)]), []
            seen[y0, x0] = True
            while queue:
                y, x = queue.popleft()
                members.append((y, x))
                for dy, dx in steps:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            touches = any(y in (0, h - 1) or x in (0, w - 1) for y, x in members)
            for y, x in members:
                sizes[y, x] = len(members)
                border[y, x] = touches
    return sizes, border


@pytest.mark.parametrize("seed", range(5))
def test_component_and_hole_sizes_match_a_flood_fill(seed):
    mask = np.random.default_rng(seed).random((14, 17)) < 0.45
    sizes, _ = flood_sizes(mask, EIGHT_STEPS)
    np.testing.assert_array_equal(component_sizes(mask), sizes)
    holes, touches = flood_sizes(~mask, FOUR_STEPS)
    np.testing.assert_array_equal(hole_sizes(mask), np.where(touches, 0, holes))


def test_diagonal_pixels_are_one_component_and_removal_is_strictly_smaller_than():
    labels = np.zeros((6, 6), np.int64)
    labels[1, 1] = labels[2, 2] = labels[3, 3] = 1  # one diagonal component of 3
    labels[0, 5] = 1  # a lone pixel
    fallback = np.full_like(labels, 7)
    kept = remove_small(labels, fallback, 1, 3)
    assert kept[1, 1] == kept[2, 2] == kept[3, 3] == 1  # size 3 is not < 3
    assert kept[0, 5] == 7  # the lone pixel takes its fallback
    removed = remove_small(labels, fallback, 1, 4)
    assert (removed[labels == 1] == 7).all()
    assert (removed[labels == 0] == 0).all()  # other pixels untouched
    np.testing.assert_array_equal(remove_small(labels, fallback, 1, 0), labels)  # 0: off


def test_holes_are_filled_below_the_size_and_border_regions_never():
    labels = np.zeros((8, 8), np.int64)
    labels[1:6, 1:6] = 1
    labels[2:4, 2:4] = 0  # an enclosed hole of 4 pixels
    labels[7, :] = 1  # a line along the border: the background under it touches the border
    np.testing.assert_array_equal(fill_holes(labels, 1, 4), labels)  # 4 is not < 4
    filled = fill_holes(labels, 1, 5)
    assert (filled[2:4, 2:4] == 1).all()
    assert filled[0, 0] == 0 and filled[6, 0] == 0  # the outside (border-touching) region stays


def test_second_choice_is_the_next_most_probable_class():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    np.testing.assert_array_equal(second_choice(probs, np.array([0, 2, 2])), [1, 1, 0])  # tie: lowest index
    np.testing.assert_array_equal(second_choice(np.array([[0.8, 0.2], [0.4, 0.6]]), np.array([0, 1])), [1, 0])


def test_postprocess_runs_classes_in_order_removal_before_filling():
    labels = np.zeros((7, 7), np.int64)
    labels[1:6, 1:6] = 2
    labels[3, 3] = 1  # a one-pixel class-1 island inside class 2
    fallback = np.where(labels == 1, 0, 1)
    # class 1's island is removed (to 0); then class 2's hole (that pixel, now 0) is filled
    out = postprocess(labels, fallback, {2: (0, 2), 1: (2, 0)})
    assert out[3, 3] == 2
    # a hole of class 2 is any enclosed region of other classes, so filling class 2 alone also takes the island
    np.testing.assert_array_equal(postprocess(labels, fallback, {2: (0, 2)}), np.where(labels == 1, 2, labels))
    np.testing.assert_array_equal(postprocess(labels, fallback, {}), labels)


def reference_postprocess(labels, fallback, settings):
    """The module's rules written out with the flood fill above: per class in index order, components (8-connected)
    under min_size take their fallback, then holes (4-connected, off the border) under max_hole become the class."""
    out = np.array(labels, copy=True)
    for cls in sorted(settings):
        min_size, max_hole = settings[cls]
        if min_size > 0:
            sizes, _ = flood_sizes(out == cls, EIGHT_STEPS)
            small = (sizes > 0) & (sizes < min_size)
            out[small] = fallback[small]
        if max_hole > 0:
            sizes, touches = flood_sizes(out != cls, FOUR_STEPS)
            small = (sizes > 0) & (sizes < max_hole) & ~touches
            out[small] = cls
    return out


def test_postprocess_matches_the_rules_written_out_on_random_maps():
    changed = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        k = 2 + seed % 3
        labels = rng.choice(k, size=(16, 19), p=np.r_[0.6, np.full(k - 1, 0.4 / (k - 1))])
        fallback = (labels + 1 + rng.integers(0, k - 1, labels.shape)) % k  # any other class
        settings = {int(c): (int(rng.choice([0, 2, 4, 9])), int(rng.choice([0, 2, 5, 12])))
                    for c in rng.choice(k, size=rng.integers(1, k + 1), replace=False)}
        before = labels.copy()
        out = postprocess(labels, fallback, settings)
        np.testing.assert_array_equal(out, reference_postprocess(labels, fallback, settings), err_msg=str(seed))
        np.testing.assert_array_equal(labels, before)  # the input map is not modified
        changed += int(not np.array_equal(out, labels))
    assert changed >= 8  # most of these maps and settings do change something


def test_the_policy_post_processes_after_its_rule_with_fallbacks_from_q():
    """DecisionPolicy.labels: the rule on q, then post-processing whose fallback is the next most probable class by q
    (the prior-corrected probabilities, not p): a removed pixel goes where q, not p, ranks it second."""
    from segtrain.policy.policy import DecisionPolicy

    p = np.zeros((5, 5, 3))
    p[...] = [0.6, 0.25, 0.15]  # background everywhere ...
    p[2, 2] = [0.15, 0.25, 0.6]  # ... but one pixel of class 2, whose runner-up by p is class 1
    weights = [1.0, 4.0, 1.0]  # dividing by the weights (tau 1) makes class 0 the runner-up there by q
    policy = DecisionPolicy(["a", "b", "c"], class_weights=weights, tau=1.0, postprocess={2: (2, 0)})
    q = policy.scores(p)
    assert second_choice(p, np.full((5, 5), 2))[2, 2] == 1 and second_choice(q, np.full((5, 5), 2))[2, 2] == 0
    raw = policy.decide(q)
    assert raw[2, 2] == 2 and (np.delete(raw.ravel(), 12) == 0).all()
    np.testing.assert_array_equal(policy.labels(q), np.zeros((5, 5), int))  # the lone pixel, removed, takes class 0
    np.testing.assert_array_equal(policy.without_postprocess().labels(q), raw)
    kept = DecisionPolicy(["a", "b", "c"], class_weights=weights, tau=1.0, postprocess={2: (1, 0)})
    np.testing.assert_array_equal(kept.labels(q), raw)  # size 1 is not < 1
