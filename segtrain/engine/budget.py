"""Training for a wall-clock budget (`train.budget`): measure the step time, plan the steps, record the plan.

The rules, one constant each (below), in the order a budgeted run meets them:

1. **Measure.** The budget clock starts when the training loop starts (after the data checks and the class
   statistics, which it does not cover). One step traces the compiled step function (its time, less one step, is
   `trace_seconds`: the planned schedule's step is traced again after planning and costs about as much), one call
   of `train.steps_per_execution` steps warms the input pipeline, then calls are timed until `MEASURE_SECONDS` or
   `MEASURE_SHARE` of the budget has passed, whichever is smaller (at least one call); the step time is that of
   the calls in the window's second half (the first may run on batches prefetched during the trace, faster than
   the input pipeline keeps up with). One validation batch traces
   the validation step, then one whole validation pass is timed (validation runs at each validated epoch end), and
   the writes of an epoch end (history, last.keras, best.keras, history.png, TensorBoard, a checkpoint) are
   rehearsed in a scratch folder, the second time timed (the first pays one-off imports).
   Every measured step is a real optimizer step of the run and counts towards its total: the step count, and
   with it the schedule's length, is known only after them, so they run at the schedule's starting rate (1% of
   train.learning_rate with a warm-up, the full rate without one), and warm-up and cosine then span the remaining
   steps (`segtrain.engine.schedules.AfterMeasuring`).
2. **Plan** (`plan_budget`, a pure function). The time left, `budget * (1 - MARGIN)` less the time already spent
   and one more trace, pays for the remaining steps, the validations and the epoch ends: `(total - measured) * step
   + validations * validation + epochs * epoch_end <= left`. Epochs: one pass over the training set when that gives
   `MIN_VALIDATIONS` to `MAX_VALIDATIONS` validations whose cost (with the epoch ends') is at most
   `MAX_VALIDATION_SHARE` of the budget (the last epoch may be a partial pass, ending at the planned step);
   otherwise a fixed number of steps chosen so that validation runs `CADENCE_VALIDATIONS` times, or fewer when that
   would cost more than `MAX_VALIDATION_SHARE` (at least once, at the end). A configured `train.steps_per_epoch` is
   kept as the epoch's length. The first epoch holds the measured steps. A budget too small to train after
   measuring stops after the measured steps, in one epoch, with a warning. `MARGIN` covers the rest: variation of
   the step time, the progress bar, the first epoch's input pipeline.
3. **Record.** The plan goes to `PLAN_FILE` in the run folder before the first checkpoint; `--resume` reads it
   back and never measures again, so a resumed run ends at the same step, with the same weights (bit for bit with
   train.deterministic on the CPU), as an uninterrupted one.
4. **Re-plan** (`replan`, a pure function). A step time measured in the first seconds can be far off when the
   machine's load changes (measured while other jobs ran, a run then finishes in a third of its budget). At each
   epoch end the wall time per step of the last `REPLAN_WINDOW` epochs (validation and writes included) prices
   the time left; when the steps that fit differ from the planned end by more than `REPLAN_SHARE`, the run's end
   moves there. The learning rate stays continuous: from the re-planned step on, the schedule runs through the rest
   of its course, stretched or squeezed to end at the new last step (`segtrain.engine.schedules.Stretched`). Each
   re-plan is recorded in `PLAN_FILE` before that epoch's checkpoint; a resumed run replays the recorded ones and
   makes no new ones (the time spent before the interruption is not known).

Nothing here imports TensorFlow: the loop (`segtrain.engine.loop.measure_and_plan`) hands `measure` its steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from segtrain.errors import CheckpointError
from segtrain.value_types import format_duration, parse_duration  # noqa: F401 (parse_duration: re-exported)

PLAN_FILE = "budget.json"
"""The recorded plan, in the run folder."""

MARGIN = 0.05
"""Share of the budget left unplanned: the step time varies (a shared machine, the first pass over the data)."""
MEASURE_SECONDS = 20.0
MEASURE_SHARE = 0.02
"""Steps are timed for min(MEASURE_SECONDS, MEASURE_SHARE x budget) seconds (at least one compiled call)."""
MIN_VALIDATIONS = 5
MAX_VALIDATIONS = 50
"""An epoch stays one pass over the training set when that gives this many validations (and a bounded share)."""
CADENCE_VALIDATIONS = 20
"""Otherwise the epoch is a fixed number of steps, planned for this many validations ..."""
MAX_VALIDATION_SHARE = 0.10
"""... or fewer, so that validation costs at most this share of the budget (always at least one, at the end)."""
REPLAN_SHARE = 0.05
"""An epoch end re-plans when the steps that fit the time left differ from the planned end by more than this share."""
REPLAN_WINDOW = 3
"""... priced at the wall time per step of the last this many epochs (validation and epoch-end writes included)."""

clock: Callable[[], float] = time.perf_counter
"""The clock `measure` reads (a module attribute, so a test can make the measurement deterministic)."""

def clock_text(seconds: float) -> str:
    """A duration for logs: whole seconds from a minute up (`19m31s`), tenths below (`8.4s`)."""
    return format_duration(round(seconds) if seconds >= 60 else round(seconds, 1))


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """What `measure` found: the step and validation times, and what measuring cost."""

    seconds_per_step: float
    validation_seconds: float
    steps: int
    """Optimizer steps trained while measuring (the trace step, the warm-up call and the timed calls)."""
    timed_steps: int
    seconds: float
    """Seconds from the start of the budget clock to the end of measuring (traces and validation included)."""
    trace_seconds: float
    """The first call's time less one step: what tracing the step function costs (paid again after planning)."""
    epoch_end_seconds: float = 0.0
    """What an epoch end's writes cost (history, models, plot, checkpoint), validation aside."""


class MeasuringStopped(Exception):
    """A stop (SIGINT/SIGTERM) arrived while measuring, before the plan and the first checkpoint existed."""


def measure(train_call: Callable[[int], None], validate: Callable[[bool], None], per_call: int,
            budget_seconds: float, cap: Optional[int] = None, agree: Callable[[bool], bool] = lambda done: done,
            stopped: Callable[[], bool] = lambda: False,
            epoch_end: Optional[Callable[[], None]] = None) -> Measurement:
    """Time the training step and one validation pass, training real steps while doing so.

    Args:
        train_call: runs `count` optimizer steps in one compiled call (and counts them in the loop state).
        validate: `validate(False)` runs one whole validation pass; `validate(True)` one batch (to trace).
        per_call: steps per compiled call (train.steps_per_execution).
        budget_seconds: the budget; steps are timed for min(MEASURE_SECONDS, MEASURE_SHARE x budget) seconds.
        cap: at most this many steps in all (train.steps_per_epoch: the first epoch holds the measured steps).
        agree: whether every worker agrees that timing is done (one all-reduce on multi-worker; else the value).
        stopped: whether a stop was requested (agreed across workers); raises MeasuringStopped.
        epoch_end: rehearses an epoch end's writes (run twice, the second timed).
    """
    per_call, room = max(1, int(per_call)), cap if cap is not None else math.inf
    started, steps = clock(), 0

    def call(count: int) -> float:
        nonlocal steps
        before = clock()
        train_call(count)
        steps += count
        seconds = clock() - before
        if stopped():
            raise MeasuringStopped()
        return seconds

    first = call(1)  # traces the step function
    warmup = call(int(min(per_call, room - steps))) if room > steps else None
    warmup_steps = steps - 1
    target = min(MEASURE_SECONDS, MEASURE_SHARE * budget_seconds)
    calls: list[tuple[int, float]] = []  # (steps, seconds) of each timed call
    while room > steps:
        count = int(min(per_call, room - steps))
        calls.append((count, call(count)))
        if agree(sum(seconds for _, seconds in calls) >= target):
            break
    # The calls of the window's second half: the first ones may run on batches the input pipeline prefetched
    # while the step was traced, faster than it can keep up with.
    window, elapsed, steady = sum(seconds for _, seconds in calls), 0.0, []
    for count, seconds in calls:
        if elapsed >= window / 2:
            steady.append((count, seconds))
        elapsed += seconds
    steady = steady or calls[-1:]
    timed_steps = sum(count for count, _ in steady)
    if timed_steps:
        per_step = sum(seconds for _, seconds in steady) / timed_steps
    elif warmup is not None:  # train.steps_per_epoch left no room for a timed call
        per_step = warmup / warmup_steps
    else:
        per_step = first  # one step, trace included: an overestimate, on the safe side
    validate(True)  # traces the validation step
    if stopped():
        raise MeasuringStopped()
    before = clock()
    validate(False)
    validation = clock() - before
    if stopped():
        raise MeasuringStopped()
    writes = 0.0
    if epoch_end is not None:
        epoch_end()  # imports (matplotlib) and first-time costs
        before = clock()
        epoch_end()
        writes = clock() - before
    per_step = max(per_step, 1e-9)
    return Measurement(per_step, validation, steps, timed_steps, clock() - started, max(0.0, first - per_step),
                       writes)


# ---------------------------------------------------------------------------- planning


@dataclass
class BudgetPlan:
    """How a budget becomes steps and epochs; `budget.json` in the run folder (`to_dict` / `from_dict`)."""

    budget: str
    """train.budget, as the config holds it (e.g. 20m)."""
    budget_seconds: float
    seconds_per_step: float
    validation_seconds: float
    """One validation pass over the val split."""
    epoch_end_seconds: float
    """One epoch end's writes: history.csv, last.keras, best.keras, history.png, TensorBoard, the checkpoint."""
    measured_steps: int
    """Steps trained while measuring: the first of the run, at `measuring_learning_rate`, counted in total_steps."""
    timed_steps: int
    """Of the measured steps, those timed (after the trace step and a warm-up call)."""
    measuring_seconds: float
    """Seconds from the start of training to the plan (traces, warm-up, timed steps and validation, rehearsals)."""
    trace_seconds: float
    """The estimated cost of tracing the train step, paid once more after planning (for the planned schedule)."""
    total_steps: int
    """Optimizer steps of the whole run, the measured ones included; the learning-rate schedule ends here."""
    steps_per_epoch: int
    epochs: int
    """ceil(total_steps / steps_per_epoch): the last epoch may be shorter, ending at total_steps."""
    validations: int
    epoch_is: str
    """'one pass over the training set', 'a fixed number of steps' or 'train.steps_per_epoch'."""
    planned_seconds: float
    """Expected training time: measuring, one more trace, the remaining steps, the validations and epoch ends."""
    overhead_share: float
    """The budget's share planned for validations and epoch ends."""
    margin: float = MARGIN
    measuring_learning_rate: Optional[float] = None
    """The rate of the measured steps (the schedule's starting rate); set by the training loop."""
    warnings: list = field(default_factory=list)
    replans: list = field(default_factory=list)
    """Epoch ends where the run's end moved (`replan`), in order: {after_epoch, at_step, total_steps,
    virtual_step, seconds_per_step, elapsed_seconds}. `total_steps` above stays the first plan's (the schedule's
    course); `end_step` is where the run ends."""

    def replans_until(self, epoch: Optional[int] = None) -> list:
        """The re-plans made at the end of epoch `epoch` or before (None: all)."""
        return [r for r in self.replans if epoch is None or r["after_epoch"] <= epoch]

    def end_step(self, epoch: Optional[int] = None) -> int:
        """The run's last step as planned after epoch `epoch` (None: after every recorded re-plan)."""
        made = self.replans_until(epoch)
        return int(made[-1]["total_steps"]) if made else self.total_steps

    def epochs_at(self, epoch: Optional[int] = None) -> int:
        """Epochs of the run as planned after epoch `epoch` (the last may be short, ending at `end_step`)."""
        return math.ceil(self.end_step(epoch) / self.steps_per_epoch)

    def knots(self, epoch: Optional[int] = None) -> list:
        """(at_step, virtual_step, total_steps) of the re-plans until `epoch`: the schedule's stretch points."""
        return [(int(r["at_step"]), float(r["virtual_step"]), int(r["total_steps"])) for r in self.replans_until(epoch)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BudgetPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def summary(self) -> str:
        """The plan in one line, for the log."""
        last = self.total_steps - (self.epochs - 1) * self.steps_per_epoch
        shape = f"{self.epochs} epoch(s) of {self.steps_per_epoch} steps ({self.epoch_is}"
        shape += f"; the last {last})" if last != self.steps_per_epoch else ")"
        return (f"Budget {self.budget}: measured {self.seconds_per_step:.4g} s/step, {self.validation_seconds:.3g} s "
                f"per validation, {self.epoch_end_seconds:.3g} s per epoch end ({self.measured_steps} steps trained "
                f"in {clock_text(self.measuring_seconds)} of measuring) -> {self.total_steps} steps in {shape}, "
                f"{self.validations} validation(s) ({self.overhead_share:.1%} of the budget with the epoch ends); "
                f"{clock_text(self.planned_seconds)} planned, a {self.margin:.0%} margin; the learning rate reaches "
                f"its end at step {self.total_steps}. Plan: {PLAN_FILE}")


def virtual_step(knots: list, horizon: int, step: float) -> float:
    """Where `step` falls on the first plan's course of `horizon` steps, given re-plans `knots` ((at_step,
    virtual_step, total_steps), in order): the step itself before the first; after a knot, linear from its virtual
    step at its step to `horizon` at its total. `segtrain.engine.schedules.Stretched` computes the same in TF."""
    v = float(step)
    for at, virtual, total in knots:
        if step >= at:
            v = float(horizon) if total <= at else virtual + (horizon - virtual) * (step - at) / (total - at)
    return v


def replan(plan: BudgetPlan, epoch: int, step: int, elapsed_seconds: float, seconds_per_step: float) -> Optional[dict]:
    """The re-plan at the end of epoch `epoch` (global step `step`, `elapsed_seconds` of the budget used, the last
    epochs' wall time per step), or None when the planned end still fits within REPLAN_SHARE.

    Formula:
    ```
    fits = step + floor((budget * (1 - margin) - elapsed) / seconds_per_step)   (at least step: over budget, end now)
    re-plan when |fits - end| > REPLAN_SHARE * end
    ```
    Example: a 600 s budget (570 s planned), 1000 steps planned; after 300 steps 200 s have passed at 0.4 s a step
    now: 370 s left pay 925 more steps, so the run ends at step 1225 instead of 1000.
    """
    end = plan.end_step(epoch)
    if step >= end:
        return None
    left = plan.budget_seconds * (1 - plan.margin) - elapsed_seconds
    fits = step + max(0, int(left / max(seconds_per_step, 1e-9)))
    if abs(fits - end) <= REPLAN_SHARE * end:
        return None
    virtual = virtual_step(plan.knots(epoch), plan.total_steps, step)
    return {"after_epoch": int(epoch), "at_step": int(step), "total_steps": int(fits), "virtual_step": virtual,
            "seconds_per_step": round(float(seconds_per_step), 6), "elapsed_seconds": round(float(elapsed_seconds), 3)}


def validations_for(total_steps: int, steps_per_epoch: int, validate_every: int = 1) -> int:
    """Validated epochs: every `validate_every`-th and the last."""
    return math.ceil(math.ceil(total_steps / steps_per_epoch) / validate_every)


def plan_budget(budget_seconds: float, seconds_per_step: float, validation_seconds: float, train_images: int,
                batch_size: int, measured_steps: int = 0, measuring_seconds: float = 0.0, trace_seconds: float = 0.0,
                epoch_end_seconds: float = 0.0, validate_every: int = 1, steps_per_epoch: Optional[int] = None,
                budget: Optional[str] = None, timed_steps: int = 0) -> BudgetPlan:
    """Total steps, steps per epoch and epochs that fit `budget_seconds` (the rules: the module docstring).

    Formula:
    ```
    left = budget * (1 - MARGIN) - measuring_seconds - trace_seconds
    total = the most steps with
            (total - measured_steps) * seconds_per_step + validations * validation_seconds
            + epochs * epoch_end_seconds <= left
    ```

    Example: a 1000 s budget, 0.5 s a step, 10 s a validation, free epoch ends, 400 images in batches of 8 (50
    steps a pass), nothing measured yet: left = 950 s. A pass and its validation take 35 s, so 27 passes fit
    (945 s), but 27 validations cost 27% of the budget: the epoch becomes a fixed number of steps, and 10
    validations (100 s, 10%) leave 850 s for 1700 steps, 10 epochs of 170 steps.

    Args:
        measured_steps / measuring_seconds / trace_seconds: what measuring trained and cost (`Measurement`).
        validate_every: train.validate_every (every that many epochs, and the last, validate).
        steps_per_epoch: train.steps_per_epoch when set (kept as the epoch's length), else None.
        budget: the budget as written (for messages; default: from budget_seconds).
    """
    s = max(float(seconds_per_step), 1e-9)
    v, e = max(float(validation_seconds), 0.0), max(float(epoch_end_seconds), 0.0)
    every, done = max(1, int(validate_every)), max(0, int(measured_steps))
    name = budget or format_duration(budget_seconds)
    left = budget_seconds * (1 - MARGIN) - measuring_seconds - trace_seconds
    share_limit = MAX_VALIDATION_SHARE * budget_seconds
    warnings: list[str] = []

    def overhead(total: int, per_epoch: int) -> float:
        return validations_for(total, per_epoch, every) * v + math.ceil(total / per_epoch) * e

    def longest(per_epoch: int) -> Optional[int]:
        """The most steps that fit `left` with epochs of `per_epoch` steps (None: not even the measured ones)."""
        low, high = max(done, 1), max(done, 1) + int(max(left, 0.0) / s) + 1
        if (low - done) * s + overhead(low, per_epoch) > left:
            return None
        while low < high:  # the cost grows with the steps: bisect for the largest that fits
            middle = (low + high + 1) // 2
            if (middle - done) * s + overhead(middle, per_epoch) <= left:
                low = middle
            else:
                high = middle - 1
        return low

    chosen = None
    if steps_per_epoch:
        total = longest(steps_per_epoch)
        if total is not None:
            chosen = (total, steps_per_epoch, "train.steps_per_epoch")
            if overhead(total, steps_per_epoch) > share_limit:
                warnings.append(
                    f"train.budget: with train.steps_per_epoch {steps_per_epoch}, validations and epoch ends take "
                    f"{overhead(total, steps_per_epoch) / budget_seconds:.0%} of the {name} budget; raise "
                    "train.steps_per_epoch or train.validate_every, or leave steps_per_epoch unset for the plan to "
                    "choose it.")
    else:
        one_pass = max(1, math.ceil(train_images / batch_size))
        if one_pass >= done:  # the first epoch holds the measured steps
            total = longest(one_pass)
            if total is not None:
                count = validations_for(total, one_pass, every)
                if MIN_VALIDATIONS <= count <= MAX_VALIDATIONS and overhead(total, one_pass) <= share_limit:
                    chosen = (total, one_pass, "one pass over the training set")
        if chosen is None:
            chosen = _fixed_epochs(left, s, v + every * e, done, every, share_limit, longest)
    if chosen is None:  # not even the measured steps and one validation fit
        total = max(done, 1)
        kind = "train.steps_per_epoch" if steps_per_epoch else "a fixed number of steps"
        chosen = (total, steps_per_epoch or total, kind)
        warnings.append(
            f"train.budget: {name} leaves no time to train after measuring the step time "
            f"({clock_text(measuring_seconds)} spent; a step takes {s:.3g} s, a validation {v:.3g} s): training stops after the {total} measured "
            "step(s), in one epoch, at the schedule's starting rate (the schedule never decays). Raise train.budget.")
    total, per_epoch, kind = chosen
    count, epochs = validations_for(total, per_epoch, every), math.ceil(total / per_epoch)
    extra = overhead(total, per_epoch)
    if not warnings and extra > share_limit:  # one validation at the end is never left out
        warnings.append(
            f"train.budget: one validation of the val split and its epoch end take {extra / budget_seconds:.0%} of "
            f"the {name} budget ({v:.3g} s + {e:.3g} s), more than the {MAX_VALIDATION_SHARE:.0%} planned for "
            "them: validation runs only at the end. Raise train.budget or use a smaller val split.")
    return BudgetPlan(
        budget=name, budget_seconds=float(budget_seconds), seconds_per_step=s, validation_seconds=v,
        epoch_end_seconds=e, measured_steps=done, timed_steps=int(timed_steps),
        measuring_seconds=float(measuring_seconds), trace_seconds=float(trace_seconds), total_steps=total,
        steps_per_epoch=per_epoch, epochs=epochs, validations=count, epoch_is=kind,
        planned_seconds=measuring_seconds + trace_seconds + (total - done) * s + extra,
        overhead_share=extra / budget_seconds, warnings=warnings)


def _fixed_epochs(left: float, s: float, per_validation: float, done: int, every: int, share_limit: float,
                  longest: Callable[[int], Optional[int]]):
    """(total, steps per epoch, kind) with epochs of a fixed number of steps: CADENCE_VALIDATIONS validations, or
    fewer so that they (with their `every` epoch ends: `per_validation` seconds each) cost at most `share_limit`, or
    fewer still while the measured steps and the validations do not fit; None when even one does not. When the
    epochs would be shorter than the measured steps, they get that length (and `longest` the steps that fit)."""
    by_share = int(share_limit / per_validation) if per_validation > 0 else MAX_VALIDATIONS
    for count in range(max(1, min(CADENCE_VALIDATIONS, by_share, MAX_VALIDATIONS)), 0, -1):
        steps_left = left - count * per_validation
        if steps_left < 0 or done + int(steps_left / s) < max(done, 1):
            continue
        total = done + int(steps_left / s)
        per_epoch = max(math.ceil(total / (count * every)), 1)
        if per_epoch < done:  # the first epoch holds the measured steps: fewer, longer epochs
            per_epoch, total = done, longest(done)
        return total, per_epoch, "a fixed number of steps"
    return None


# ---------------------------------------------------------------------------- the plan file


def write_plan(plan: BudgetPlan, run_dir: Path) -> None:
    from segtrain.atomic import write_json

    write_json(plan.to_dict(), run_dir / PLAN_FILE)


def read_plan(run_dir: Path, budget_seconds: float) -> BudgetPlan:
    """The plan a budgeted run recorded (on --resume), checked against the config's budget."""
    path = run_dir / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so this budgeted run cannot continue as planned (was it trained "
                              "without train.budget?). Resume with the run's own config.yaml, or start a new run.")
    try:
        plan = BudgetPlan.from_dict(json.loads(path.read_text()))
        if plan.measuring_learning_rate is None or min(plan.total_steps, plan.steps_per_epoch) < 1 \
                or plan.total_steps < plan.measured_steps:
            raise ValueError("measuring_learning_rate, total_steps >= measured_steps and steps_per_epoch >= 1 needed")
        for r in plan.replans:
            if not {"after_epoch", "at_step", "total_steps", "virtual_step"} <= set(r):
                raise ValueError("a re-plan without after_epoch, at_step, total_steps and virtual_step")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a usable budget plan ({exc}). Start a new run with --out.") from None
    if not math.isclose(plan.budget_seconds, budget_seconds, rel_tol=1e-9):
        raise CheckpointError(f"train.budget: the run was planned for {plan.budget} ({path}) but the config says "
                              f"{format_duration(budget_seconds)}. Resume with the run's own config.yaml.")
    return plan
