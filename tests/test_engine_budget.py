"""train.budget (segtrain/engine/budget.py and its use in the loop): the duration parser, the plan as a pure function
(hand-worked examples), the schedule around the measured steps, and end-to-end runs: one on the real clock (its
assertions are relations that hold at any machine speed), and a run killed with SIGKILL and resumed, which must end
at the same planned step with the same weights as an uninterrupted one. Those two measure with a fake clock (every
read advances one second), so their plan is the same on any machine and is checked against a hand-worked one."""

import itertools
import json
import math
import signal

import numpy as np
import pytest
import tensorflow as tf

from segtrain.config import config_from_dict
from segtrain.engine import budget
from segtrain.engine.budget import format_duration, parse_duration, plan_budget
from segtrain.errors import ConfigError
from tests.helpers import Interruption, history, invoke, make_stripes_dataset, weights_of, write_config

# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize("value, seconds", [
    ("20m", 1200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), (20, 1200), (2.5, 150), ("1h 30m", 5400),
    ("2H15M30S", 8130), (".5h", 1800), ("1e3", 60_000),  # exponent form: a number (of minutes), as everywhere
])
def test_durations_read_as_seconds_and_round_trip(value, seconds):
    assert parse_duration(value) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("value", ["abc", "20x", "m", "30m1h", "1h1h", "", "20", "1:30", True, [20], {"m": 20},
                                   0, -5, "0s", "0.5s", float("nan"), float("inf")])
def test_bad_durations_name_train_budget_and_the_accepted_forms(value):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"root": "x"}, "train": {"budget": value}})
    message = info.value.message
    assert message.startswith("train.budget: ") and "20m, 1h30m, 90s or 1.5h" in message, message


def test_the_config_stores_one_spelling_and_null_keeps_epochs():
    def budget_of(value):
        return config_from_dict({"data": {"root": "x"}, "train": {"budget": value}}).train

    assert budget_of(90).budget == "1h30m" and budget_of("1.5h").budget == "1h30m"
    assert budget_of("90s").budget == "1m30s" and budget_of("90s").budget_seconds == 90
    assert budget_of(None).budget is None and budget_of(None).budget_seconds is None


def test_a_budgeted_configs_saved_form_leaves_out_the_unused_epochs():
    budgeted = config_from_dict({"data": {"root": "x"}, "train": {"budget": "2m", "epochs": 7}})
    assert "epochs" not in budgeted.to_dict()["train"] and budgeted.to_dict()["train"]["budget"] == "2m"
    assert config_from_dict(budgeted.to_dict()).to_dict() == budgeted.to_dict()  # reloads to the same saved form
    plain = config_from_dict({"data": {"root": "x"}, "train": {"epochs": 7}})
    assert plain.to_dict()["train"]["epochs"] == 7


def test_fit_budget_option_is_checked_as_train_budget(tmp_path, stripes):
    config = write_config(tmp_path / "c.yaml", stripes)
    result = invoke("fit", config, "--out", tmp_path / "run", "--budget", "soon")
    assert result.exit_code == 2 and "train.budget: expected a duration" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the plan (pure)


def test_plan_leaves_one_pass_epochs_when_validation_costs_too_much():
    # 1000 s, 0.5 s/step, 10 s/validation, 400 images / 8 = 50 steps a pass: left = 950 s. A pass + validation is
    # 35 s: 27 passes fit, but 27 validations are 27% of the budget. Fixed epochs: 10 validations (100 s = 10%)
    # leave 850 s = 1700 steps, 10 epochs of 170.
    plan = plan_budget(1000, 0.5, 10, train_images=400, batch_size=8)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (1700, 170, 10, 10)
    assert plan.epoch_is == "a fixed number of steps" and plan.overhead_share == pytest.approx(0.10)
    assert plan.planned_seconds == pytest.approx(950) and not plan.warnings


def test_plan_keeps_one_pass_epochs_and_ends_with_a_partial_pass():
    # 3600 s, 0.2 s/step, 5 s/validation, 10000 images / 10 = 1000 steps a pass (200 s + 5 s): left = 3420 s;
    # 16 passes take 3280 s, and 140 s - 5 s of validation = 675 steps of a 17th: 17 validations, 2.4%.
    plan = plan_budget(3600, 0.2, 5, train_images=10_000, batch_size=10)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (16_675, 1000, 17, 17)
    assert plan.epoch_is == "one pass over the training set"
    assert plan.planned_seconds == pytest.approx(3420) and plan.overhead_share == pytest.approx(85 / 3600)


def test_plan_with_too_many_passes_validates_twenty_times():
    # 600 s, 0.1 s/step, 1 s/validation, 80 images / 8 = 10 steps a pass: left = 570 s, 285 passes would fit.
    # 20 validations (20 s) leave 550 s = 5500 steps: 20 epochs of 275.
    plan = plan_budget(600, 0.1, 1, train_images=80, batch_size=8)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (5500, 275, 20, 20)


def test_plan_counts_the_measured_steps_the_trace_and_the_epoch_ends():
    # 100 s budget; 30 steps measured in 10 s; a trace 3 s; 0.2 s/step, 2 s/validation, 0.5 s/epoch end.
    # left = 95 - 10 - 3 = 82 s. A pass (10 steps) is shorter than the measured 30: fixed epochs. A validation and
    # its epoch end cost 2.5 s, 10% of the budget allows 4: 82 - 10 = 72 s = 360 more steps, 390 in all, in 4
    # epochs of max(ceil(390 / 4), 30) = 98 steps (the last 96).
    plan = plan_budget(100, 0.2, 2, train_images=40, batch_size=4, measured_steps=30, measuring_seconds=10,
                       trace_seconds=3, epoch_end_seconds=0.5)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (390, 98, 4, 4)
    assert plan.measured_steps == 30 and plan.planned_seconds == pytest.approx(10 + 3 + 72 + 8 + 2)
    assert "the last 96" in plan.summary() and "390 steps" in plan.summary()


def test_plan_validate_every_validates_every_nth_fixed_epoch():
    # as in test_plan_with_too_many_passes..., with validate_every 2: 20 validations, 40 epochs of 138 steps
    # (ceil(5500 / 40)); the 40th epoch is the 20th validated one.
    plan = plan_budget(600, 0.1, 1, train_images=80, batch_size=8, validate_every=2)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (5500, 138, 40, 20)


def test_plan_keeps_a_configured_epoch_length_and_warns_when_validation_costs_too_much():
    # 100 s, 0.1 s/step, 1 s/validation, 50-step epochs, 20 steps measured in 5 s: left = 90 s.
    # 15 full epochs cost (750 - 20) * 0.1 + 15 = 88 s; a 16th epoch of 10 steps and its validation fit
    # (740 * 0.1 + 16 = 90 s): 760 steps, the last epoch 10 steps; 16 validations are 16% of the budget.
    plan = plan_budget(100, 0.1, 1, train_images=1000, batch_size=4, measured_steps=20, measuring_seconds=5,
                       steps_per_epoch=50)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (760, 50, 16, 16)
    assert plan.epoch_is == "train.steps_per_epoch"
    assert len(plan.warnings) == 1 and "16%" in plan.warnings[0] and "train.steps_per_epoch" in plan.warnings[0]


def test_a_tiny_budget_trains_the_measured_steps_in_one_epoch_with_a_warning():
    # 10 s: 8 s spent measuring 4 steps, left = 1.5 s < one 3 s validation
    plan = plan_budget(10, 0.5, 3, train_images=100, batch_size=4, measured_steps=4, measuring_seconds=8)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epochs, plan.validations) == (4, 4, 1, 1)
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("train.budget: 10s leaves no time to train")


@pytest.mark.parametrize("budget_seconds", [30, 600, 7200])
@pytest.mark.parametrize("per_step, validation, end", [(0.01, 0.05, 0.3), (0.3, 4.0, 1.0), (2.0, 60.0, 2.0)])
@pytest.mark.parametrize("images, measured", [(8, 17), (5000, 40), (100_000, 9)])
def test_plans_fit_the_budget_bound_the_validation_share_and_hold_the_measured_steps(
        budget_seconds, per_step, validation, end, images, measured):
    spent = min(budget_seconds * 0.4, measured * per_step + validation + 2 * end + 1.0)
    plan = plan_budget(budget_seconds, per_step, validation, images, 8, measured_steps=measured,
                       measuring_seconds=spent, trace_seconds=1.0, epoch_end_seconds=end)
    assert plan.total_steps >= measured and plan.steps_per_epoch >= measured  # the first epoch holds them
    assert plan.epochs == math.ceil(plan.total_steps / plan.steps_per_epoch)
    assert plan.validations == plan.epochs  # validate_every 1
    if plan.warnings:  # without a configured steps_per_epoch: a budget too small to train, or to validate twice
        (warning,) = plan.warnings
        assert "leaves no time" in warning and plan.total_steps == measured and plan.epochs == 1 or \
            "validation runs only at the end" in warning and plan.validations == 1 and plan.total_steps > measured
    else:
        assert plan.planned_seconds <= budget_seconds * (1 - budget.MARGIN) + 1e-9
        assert plan.overhead_share <= budget.MAX_VALIDATION_SHARE + 1e-9
        assert 1 <= plan.validations <= budget.MAX_VALIDATIONS
        # and it uses the budget: at most a step, an epoch end and the validation share's rounding are left over
        slack = budget_seconds * (1 - budget.MARGIN - budget.MAX_VALIDATION_SHARE) - per_step - validation - end
        assert plan.planned_seconds >= slack


# ---------------------------------------------------------------------------- measuring (fake steps and clock)


def fake_steps():
    calls, validations = [], []
    return calls, validations, calls.append, validations.append


def test_measure_traces_warms_up_times_the_second_half_and_validates(monkeypatch):
    monkeypatch.setattr(budget, "clock", fake_clock())  # every read: one second later
    calls, validations, train_call, validate = fake_steps()
    ends = []
    found = budget.measure(train_call, validate, per_call=2, budget_seconds=80, epoch_end=lambda: ends.append(1))
    # a trace call of 1 step, a warm-up call of 2, then timed calls of 2 until 2% of 80 s (1.6 s): two calls of
    # 1 s; the second half of the window is the second call: 0.5 s/step. Then one validation batch (untimed) and a
    # timed pass (1 s), two epoch-end rehearsals (the second timed, 1 s); 13 clock reads after the start.
    assert calls == [1, 2, 2, 2] and validations == [True, False] and len(ends) == 2
    assert found == budget.Measurement(seconds_per_step=0.5, validation_seconds=1.0, steps=7, timed_steps=2,
                                       seconds=13.0, trace_seconds=0.5, epoch_end_seconds=1.0)


def test_measure_stays_within_a_configured_epoch_and_stops_on_a_signal(monkeypatch):
    monkeypatch.setattr(budget, "clock", fake_clock())
    calls, _, train_call, validate = fake_steps()
    found = budget.measure(train_call, validate, per_call=8, budget_seconds=3600, cap=5)
    assert calls == [1, 4] and found.steps == 5 and found.timed_steps == 0  # no room left to time: the warm-up's
    assert found.seconds_per_step == pytest.approx(1 / 4)
    calls, _, train_call, validate = fake_steps()
    with pytest.raises(budget.MeasuringStopped):
        budget.measure(train_call, validate, per_call=8, budget_seconds=3600, stopped=lambda: len(calls) == 2)
    assert calls == [1, 8]


# ---------------------------------------------------------------------------- schedule and loop state


def test_after_measuring_holds_the_starting_rate_then_spans_the_planned_steps():
    from segtrain.config import TrainConfig
    from segtrain.engine.schedules import make_budget_schedule, measuring_rate

    train = TrainConfig(learning_rate=0.1, warmup_epochs=1)
    plan = plan_budget(100, 0.2, 2, 40, 4, measured_steps=30, measuring_seconds=10, trace_seconds=3,
                       epoch_end_seconds=0.5)  # 390 steps, epochs of 98 (see above)
    plan.measuring_learning_rate = measuring_rate(train)
    schedule = make_budget_schedule(train, plan)
    lr = np.array([float(schedule(step)) for step in range(plan.total_steps + 1)])
    np.testing.assert_allclose(lr[:31], 0.001, rtol=1e-6)  # measured steps at 1% (a warm-up is configured)
    np.testing.assert_allclose(lr[30 + 98], 0.1, rtol=1e-5)  # then a warm-up of one planned epoch (98 steps)
    assert np.all(np.diff(lr[30 + 98:]) < 0) and lr[-1] == pytest.approx(0.001, rel=1e-4)  # cosine to its end
    assert measuring_rate(TrainConfig(learning_rate=0.1)) == 0.1  # without warm-up, the full rate


# ---------------------------------------------------------------------------- re-planning


def replanned_fixture():
    from segtrain.config import TrainConfig
    from segtrain.engine.schedules import measuring_rate

    train = TrainConfig(learning_rate=0.1, warmup_epochs=1)
    plan = plan_budget(600, 0.5, 2, 40, 4, measured_steps=10, measuring_seconds=10, trace_seconds=1)
    plan.measuring_learning_rate = measuring_rate(train)
    return train, plan


def test_replan_worked_example_and_tolerance():
    _, plan = replanned_fixture()
    plan.total_steps = 1000  # as in the docstring's example: a 600 s budget, 570 s planned
    made = budget.replan(plan, epoch=3, step=300, elapsed_seconds=200, seconds_per_step=0.4)
    assert made["total_steps"] == 300 + 925 and made["virtual_step"] == 300.0  # 370 s left / 0.4 s
    assert budget.replan(plan, 3, 300, 200, 370 / 720) is None  # 1020 steps: within 5% of 1000
    over = budget.replan(plan, 3, 300, 580, 0.4)  # past the planned 570 s: the run ends at this epoch end
    assert over["total_steps"] == 300
    assert budget.replan(plan, 3, 1000, 200, 0.4) is None  # at the end already


def test_the_stretched_schedule_is_continuous_and_ends_at_the_moved_end():
    from segtrain.engine.schedules import make_budget_schedule

    train, plan = replanned_fixture()
    base = make_budget_schedule(train, plan)
    horizon = plan.total_steps
    first = budget.replan(plan, 2, 200, 100, 0.25)  # faster than planned: the end moves later
    plan.replans = [first]
    second = budget.replan(plan, 5, 500, 300, 1.0)  # then slower: earlier again
    plan.replans = [first, second]
    assert first["total_steps"] > horizon and second["total_steps"] < first["total_steps"]
    knots = plan.knots()
    # where the second knot sits on the course, by hand: linear from (200, 200) to (first total, horizon)
    assert second["virtual_step"] == pytest.approx(200 + (horizon - 200) * 300 / (first["total_steps"] - 200))
    stretched = make_budget_schedule(train, plan)
    for step in (0, 150, 200, 201, 350, 499, 500, 501, second["total_steps"] - 1, second["total_steps"]):
        v = budget.virtual_step(knots, horizon, step)
        assert float(stretched(step)) == pytest.approx(float(base(round(v))), rel=1e-6), step
    # continuous at each knot: the rate just after equals the rate the previous course gave just before
    for at in (200, 500):
        assert float(stretched(at)) == pytest.approx(float(base(round(budget.virtual_step(knots, horizon, at - 1)))),
                                                     rel=2e-2)
    assert float(stretched(second["total_steps"])) == pytest.approx(float(base(horizon)), rel=1e-6)  # the end
    # the schedule as of an epoch before a re-plan is the course before it (what a resumed run rebuilds)
    assert float(make_budget_schedule(train, plan, epoch=2)(600)) == pytest.approx(
        float(base(round(budget.virtual_step(knots[:1], horizon, 600)))), rel=1e-6)
    assert plan.end_step(1) == horizon and plan.end_step(2) == first["total_steps"]
    assert plan.epochs_at() == math.ceil(second["total_steps"] / plan.steps_per_epoch)


def test_the_loop_replays_a_recorded_replan_and_makes_new_ones_only_where_it_measured(tmp_path):
    from types import SimpleNamespace

    from segtrain.engine.loop import replan_at_epoch_end

    _, plan = replanned_fixture()
    applied = []
    engine = SimpleNamespace(plan=plan, loop=SimpleNamespace(epoch=2, global_step=2 * plan.steps_per_epoch),
                             epochs=plan.epochs, chief=True, trainer=SimpleNamespace(agreed_mean=lambda v: v),
                             apply_plan=lambda p, epoch: applied.append(epoch))
    times = [(30.0, plan.steps_per_epoch), (10.0, plan.steps_per_epoch)]  # the first epoch (a trace) is left out
    clock = iter([100.0])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget, "clock", lambda: next(clock))
        replan_at_epoch_end(engine, times, budget_clock=0.0, run_dir=tmp_path, log=lambda *a: None)
    made = plan.replans[0]
    per_step = 10.0 / plan.steps_per_epoch
    assert made["total_steps"] == engine.loop.global_step + int((600 * 0.95 - 100) / per_step) and applied == [2]
    assert json.loads((tmp_path / budget.PLAN_FILE).read_text())["replans"] == [made]  # recorded first
    # a resumed run (no budget clock) replays what was recorded at that epoch, and decides nothing new
    applied.clear()
    replan_at_epoch_end(engine, times, budget_clock=None, run_dir=tmp_path, log=lambda *a: None)
    engine.loop.epoch = 3
    replan_at_epoch_end(engine, times, budget_clock=None, run_dir=tmp_path, log=lambda *a: None)
    assert applied == [2] and plan.replans == [made]


def test_a_loop_state_with_total_steps_ends_its_last_epoch_early():
    from segtrain.engine.state import LoopState

    loop = LoopState("val_mean_iou", steps_per_epoch=98, global_step=30, total_steps=390)
    assert (loop.epoch_steps, loop.steps_left_in_epoch) == (98, 68)
    loop.epoch, loop.global_step = 3, 294
    assert (loop.epoch_steps, loop.steps_left_in_epoch) == (96, 96)
    assert LoopState("loss", 5, epoch=1, global_step=7).steps_left_in_epoch == 3  # no total: as before


# ---------------------------------------------------------------------------- end to end

TICK = 1.0
"""The fake clock's step: every read advances it by one second."""
FAKE_PLAN = {"measured_steps": 7, "total_steps": 116, "steps_per_epoch": 29, "epochs": 4, "validations": 4}
"""With the fake clock, budget 80s and 2 steps per call, `measure` reads: a trace call of 1 step (1 s), a warm-up
call of 2 steps (1 s), timed calls of 2 steps until 2% of the budget (1.6 s): 2 calls, 0.5 s/step, so 7 measured
steps; validation 1 s, epoch end 1 s; 13 s spent, trace 1 - 0.5 = 0.5 s. left = 76 - 13.5 = 62.5 s; a pass (2 steps)
is shorter than 7: fixed epochs; 2 s per validation with its epoch end, 10% allows 4: 54.5 s = 109 more steps,
116 in all, 4 epochs of 29."""
LAUNCH = ("import itertools, segtrain.engine.budget as b; c = itertools.count(); "
          f"b.clock = lambda: next(c) * {TICK}; b.REPLAN_SHARE = float('inf'); from segtrain.cli import main; main()")
"""The fake clock also prices the loop's epochs (a second each, far from the planned steps' time): re-planning is
off in these runs (REPLAN_SHARE infinite), whose point is the plan and exact resume."""


def fake_clock():
    counter = itertools.count()
    return lambda: next(counter) * TICK


def budget_config(base, root):
    return write_config(
        base / "budget.yaml", root, model={"depth": 2, "base_filters": 4, "dropout": 0.3},
        loss={"terms": [{"name": "cross_entropy"}, {"name": "jaccard", "weight": 0.5}], "class_weights": "balanced"},
        train={"budget": "80s", "steps_per_epoch": None, "steps_per_execution": 2, "checkpoint_every_steps": 10,
               "learning_rate": 0.01, "seed": 1, "warmup_epochs": 1, "deterministic": True, "keep_checkpoints": 20},
        predict={"calibrate": False},  # the time after training is not what these tests are about
    )


def after_the_plan(run) -> bool:
    """A checkpoint after the one written at the plan (global step FAKE_PLAN's measured_steps) exists."""
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    return bool(latest) and int(latest.rsplit("-", 1)[1]) > FAKE_PLAN["measured_steps"]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    """A budgeted run killed with SIGKILL after the plan (subprocess) and the uninterrupted one (in this process),
    both measuring on the fake clock, at once."""
    base = tmp_path_factory.mktemp("budget")
    root = make_stripes_dataset(base / "data", n_train=8, n_val=3)
    config = budget_config(base, root)
    killed = Interruption(config, base / "killed", signal.SIGKILL, launch=("-c", LAUNCH), due=after_the_plan)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget, "clock", fake_clock())
        patch.setattr(budget, "REPLAN_SHARE", math.inf)
        result = invoke("fit", config, "--out", base / "full")
    assert result.exit_code == 0, result.output
    return base, config, killed.finish(), result.output


@pytest.mark.slow
def test_the_plan_is_recorded_logged_and_the_schedule_ends_at_the_planned_step(budgeted, float32_policy):
    base, _, _, output = budgeted
    plan = json.loads((base / "full" / budget.PLAN_FILE).read_text())
    assert {key: plan[key] for key in FAKE_PLAN} == FAKE_PLAN
    assert plan["budget"] == "1m20s" and plan["budget_seconds"] == 80 and plan["seconds_per_step"] == 0.5
    assert plan["measuring_learning_rate"] == pytest.approx(1e-4) and plan["epoch_is"] == "a fixed number of steps"
    assert "Budget 1m20s: measured 0.5 s/step" in output and "116 steps in 4 epoch(s) of 29 steps" in output
    assert "Training took" in output and "Calibration and evaluation follow" in output
    rows = history(base / "full")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and [int(r["step"]) for r in rows] == [29, 58, 87, 116]
    lr = [float(r["lr"]) for r in rows]
    # after epoch 1 (step 29): 22 steps into the 29-step warm-up that follows the 7 measured steps
    assert lr[0] == pytest.approx(0.01 * (0.01 + 0.99 * 22 / 29), rel=1e-4)
    assert lr[-1] == pytest.approx(0.01 * 0.01, rel=1e-4)  # the cosine's end (alpha 1%) at the planned last step
    assert all(key in rows[-1] and rows[-1][key] != "" for key in ("val_loss", "val_mean_iou"))


@pytest.mark.slow
def test_a_killed_budgeted_run_resumes_with_its_plan_to_the_same_weights(budgeted, float32_policy, monkeypatch):
    base, config, killed, _ = budgeted
    run = killed.run
    assert killed.proc.returncode == -signal.SIGKILL and not (run / "metrics.json").exists()

    def no_measuring():
        raise AssertionError("a resumed run measured the step time again")

    monkeypatch.setattr(budget, "clock", no_measuring)  # a resumed run neither measures nor re-plans
    result = invoke("fit", config, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "measured" not in result.output and f"planned for the 1m20s budget in {run / 'budget.json'}" in result.output
    plans = [json.loads((r / budget.PLAN_FILE).read_text()) for r in (run, base / "full")]
    assert plans[0] == plans[1]  # the fake clock makes even the timings equal
    for name in ("last.keras", "best.keras"):
        for a, b in zip(weights_of(run / name), weights_of(base / "full" / name)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert history(run) == history(base / "full") and int(history(run)[-1]["step"]) == FAKE_PLAN["total_steps"]
    ours, theirs = (json.loads((r / "metrics.json").read_text()) for r in (run, base / "full"))
    assert ours["confusion_matrix"] == theirs["confusion_matrix"] and ours["best_epoch"] == theirs["best_epoch"]


@pytest.mark.slow
def test_a_few_second_budget_on_the_real_clock(tmp_path, stripes, float32_policy):
    """Whatever this machine's speed: the plan is recorded and consistent, training ends at its planned step, and
    the learning rate ends where the plan says (the cosine's end, or the starting rate when nothing was left)."""
    config = write_config(tmp_path / "c.yaml", stripes, predict={"calibrate": False},
                          train={"epochs": 2, "steps_per_epoch": None, "learning_rate": 0.01, "seed": 1})
    result = invoke("fit", config, "--out", tmp_path / "run", "--budget", "4s")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / budget.PLAN_FILE).read_text())
    assert plan["budget"] == "4s" and plan["seconds_per_step"] > 0 and plan["validation_seconds"] > 0
    assert plan["total_steps"] >= plan["measured_steps"] >= 3 and plan["steps_per_epoch"] >= plan["measured_steps"]
    end = plan["replans"][-1]["total_steps"] if plan["replans"] else plan["total_steps"]  # re-planned on drift
    rows = history(tmp_path / "run")
    assert len(rows) == math.ceil(end / plan["steps_per_epoch"]) and int(rows[-1]["step"]) == end
    last_rate = 0.01 * 0.01 if end > plan["measured_steps"] else 0.01  # no warm-up: measured at 0.01
    assert float(rows[-1]["lr"]) == pytest.approx(last_rate, rel=1e-4)
    if plan["warnings"]:
        assert plan["total_steps"] == plan["measured_steps"] and f"warning: {plan['warnings'][0]}" in result.output
    assert "Budget 4s: measured" in result.output and "of the 4s budget" in result.output
