"""segtrain/engine/schedules.py: learning-rate warm-up and schedules, reduce-on-plateau bookkeeping."""

import numpy as np
import pytest
import tensorflow as tf

from segtrain.config import TrainConfig


def test_cosine_warmup_rises_linearly_then_decays_to_alpha():
    from segtrain.engine.schedules import make_schedule

    train = TrainConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=2)
    schedule = make_schedule(train, total_steps=40, steps_per_epoch=5)  # warm-up: 2 epochs x 5 = 10 steps
    lr = np.array([float(schedule(step)) for step in range(41)])
    # warm-up from 1% (0.001) to 0.1 in 10 equal steps of 0.0099
    np.testing.assert_allclose(lr[:11], 0.001 + 0.0099 * np.arange(11), rtol=1e-5)
    assert np.all(np.diff(lr[10:]) < 0)  # then strictly decreasing
    # cosine over the 30 remaining steps: half way, (1 + cos(pi/2)) / 2 = 0.5 of the way from 0.1 to alpha*0.1
    assert lr[25] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5, rel=1e-4)
    assert lr[40] == pytest.approx(0.001, rel=1e-4)  # alpha = 0.01


def test_constant_and_plateau_schedules_share_the_warmup_and_plateau_follows_its_scale():
    from segtrain.engine.schedules import make_schedule

    scale = tf.Variable(1.0)
    constant = make_schedule(TrainConfig(learning_rate=0.2, schedule="constant", warmup_epochs=1), 100, 4, scale)
    plateau = make_schedule(TrainConfig(learning_rate=0.2, schedule="plateau", warmup_epochs=1), 100, 4, scale)
    # 4 warm-up steps: 0.002, 0.0515, 0.101, 0.1505, then 0.2
    expected = [0.002, 0.0515, 0.101, 0.1505, 0.2, 0.2]
    np.testing.assert_allclose([float(constant(s)) for s in range(6)], expected, rtol=1e-5)
    np.testing.assert_allclose([float(plateau(s)) for s in range(6)], expected, rtol=1e-5)
    scale.assign(0.25)
    assert float(plateau(50)) == pytest.approx(0.05)
    assert float(constant(50)) == pytest.approx(0.2)  # constant ignores the plateau scale


def test_plateau_state_lowers_after_patience_and_stops_at_the_minimum():
    from segtrain.engine.schedules import PlateauState

    scale, wait = tf.Variable(1.0), tf.Variable(0, dtype=tf.int64)
    train = TrainConfig(learning_rate=0.1, schedule="plateau", plateau_factor=0.5, plateau_patience=2,
                        plateau_min_learning_rate=0.02)
    plateau = PlateauState(train, scale, wait)
    # improved, stalled, stalled (-> 0.5), stalled, improved (wait reset), stalled, stalled (-> 0.25),
    # stalled, stalled (-> 0.2 = min 0.02 / 0.1), stalled, stalled (already at the minimum)
    events = [True, False, False, False, True, False, False, False, False, False, False]
    lowered = [plateau.update(e) for e in events]
    assert lowered == [None, None, 0.5, None, None, None, 0.25, None, pytest.approx(0.2), None, None]
    assert float(scale.numpy()) == pytest.approx(0.2)
