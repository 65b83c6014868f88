"""The `segtrain` command line: one function per verb.

Exit codes: 0 success, 2 bad usage, config or data (one message, no traceback),
1 anything else.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe for GPUs with C++ stderr muted (CUDA-probe chatter on CPU-only machines)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)


COMMAND_ORDER = ("plan", "stats", "fit", "eval", "calibrate", "tune", "predict", "export", "report", "compare")
"""The commands in the order of the work, as `segtrain --help` lists them."""


class WorkOrderGroup(click.Group):
    """A group that lists its commands in the order of the work (COMMAND_ORDER), not alphabetically."""

    def list_commands(self, ctx):
        known = [name for name in COMMAND_ORDER if name in self.commands]
        return known + sorted(set(self.commands) - set(known))


@click.group(cls=WorkOrderGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segtrain")
def cli():
    """Train U-Net segmentation models on imbalanced, cost-sensitive data from one YAML config.

    Commands that read a trained run take it first: segtrain eval RUN, segtrain predict RUN IMAGES...,
    segtrain calibrate RUN, segtrain tune RUN, segtrain export RUN (RUN: a run folder written by fit)."""


def run_argument(command):
    """RUN, the first positional argument of every command that reads a trained run."""
    return click.argument("run", metavar="RUN", required=False, type=click.Path())(command)


def checkpoint_alias(command):
    """--checkpoint, the old spelling of RUN on eval and predict: hidden, still accepted, with a note."""
    return click.option("--checkpoint", type=click.Path(), hidden=True,
                        help="Deprecated: pass the run folder as RUN, the first argument.")(command)


def run_overrides(command):
    """--set on the commands that read a run: predict.* settings of the run's config, for this command only."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Change a predict.* setting of the run's config for this command only, e.g. --set predict.tta=true or "
             "--set predict.tuned=false (repeatable; config.yaml is not changed; other keys were fixed by training)."
    )(command)


def _open_run(command: str, run, checkpoint=None, overrides=(), usage: str = "RUN"):
    """Resolve the run (RUN or the deprecated --checkpoint) and its config with `overrides`, before TensorFlow
    loads; print the model file used and each override. Returns (model file, run folder, config)."""
    from segtrain.runs import describe_overrides, newest_run_hint, resolve_checkpoint, run_config

    if checkpoint is not None:
        if run is not None:
            raise click.UsageError(f"the run is given twice ({run} and --checkpoint {checkpoint}); pass it once, "
                                   f"first: segtrain {command} {usage}.")
        click.echo(f"note: --checkpoint is deprecated; pass the run first: segtrain {command} {checkpoint} ...",
                   err=True)
        run = checkpoint
    if run is None:
        raise click.UsageError(f"missing RUN: name the run first, segtrain {command} {usage} ({newest_run_hint()}).")
    model_path, run_dir = resolve_checkpoint(run)
    config = run_config(run_dir, overrides)
    click.echo(f"Using {model_path} (run {run_dir})")
    for line in describe_overrides(run_dir, overrides):
        click.echo(line)
    return model_path, run_dir, config


def _check_split(config, data_root, split, run_dir) -> str:
    """The split a command reads (default: the run's data.val_split), its folders (and with data.val_fraction the
    run's split.json) checked before TensorFlow loads."""
    from segtrain.data.holdout import split_pairs

    split = split or config.data.val_split
    split_pairs(config, split, run_dir, data_root)
    return split


@cli.command(short_help="Train a model from CONFIG; write a run folder.")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value by dotted path, e.g. --set train.epochs=2 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False),
              help="The run folder to write (default: runs/<config file name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the run folder from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--budget", metavar="DURATION",
              help="Train for this wall-clock time instead of train.epochs, e.g. 20m, 1h30m, 90s (same as "
                   "--set train.budget=DURATION): the step time is measured first and the steps planned to fit.")
def fit(config_path, overrides, out, resume, overwrite, budget):
    """Train a model from CONFIG and write a run folder."""
    _import_tensorflow_quietly()
    from segtrain.api import fit as fit_run

    if budget is not None:
        overrides = [*overrides, f"train.budget={budget}"]
    result = fit_run(config_path, overrides, out, resume=resume, overwrite=overwrite, log=click.echo)
    mean_iou = result.metrics.get("mean_iou")
    shown = "n/a" if mean_iou is None else f"{mean_iou:.4f}"
    click.echo(f"Done: {result.run_dir} (best.keras, last.keras, metrics.json, report.html). "
               f"Mean IoU on {result.val_split}: {shown}")


DECISION_HELP = "Decision rule (default: the run's predict.decision, argmax unless set)."
THRESHOLD_HELP = "Foreground probability threshold (two classes); implies --decision threshold."
TTA_HELP = "Average over flips (default: the run's predict.tta, off unless set)."


@cli.command("eval", short_help="Per-class metrics of a run on a labelled split.")
@run_argument
@checkpoint_alias
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
@click.option("--split", help="Split folder to evaluate (default: the run's data.val_split).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Report folder for metrics.json, per_class.csv, per_image.csv and the plots (default: "
                   "RUN/eval_<split>).")
@click.option("--decision", type=click.Choice(["argmax", "cost", "threshold"]), help=DECISION_HELP)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=THRESHOLD_HELP)
@click.option("--relaxed", "relaxed_rho", type=click.FloatRange(min=0), metavar="RHO",
              help="Also report relaxed precision/recall: a hit within RHO pixels counts (thin structures).")
@click.option("--tta/--no-tta", default=None, help=TTA_HELP)
@click.option("--worst", type=click.IntRange(min=0), default=6, show_default=True, metavar="K",
              help="Rows of worst_images.png: the K images of lowest mean foreground IoU (0: no gallery).")
@click.option("--all-images", is_flag=True,
              help="Score every image of the split, also when `segtrain tune --holdout` tuned on some of them "
                   "(default then: only the held-out images).")
@run_overrides
def eval_command(run, checkpoint, data_root, split, out, decision, threshold, relaxed_rho, tta, worst, all_images,
                 overrides):
    """Per-class and per-image metrics of RUN's model on a labelled split.

    RUN is a run folder written by `segtrain fit` (or one of its .keras files)."""
    decision = _decision_from_options(decision, threshold)
    model_path, run_dir, config = _open_run("eval", run, checkpoint, overrides)
    split = _check_split(config, data_root, split, run_dir)
    _import_tensorflow_quietly()
    from segtrain.evaluation import evaluate_checkpoint

    evaluate_checkpoint(str(model_path), data_root, split, Path(out) if out else None, decision, threshold,
                        relaxed_rho, worst=worst, tta=tta, overrides=overrides, all_images=all_images)


@cli.command(short_help="Write one mask per image with a run's model.")
@click.argument("paths", nargs=-1, metavar="RUN IMAGES...", type=click.Path())
@checkpoint_alias
@click.option("--out", type=click.Path(file_okay=False),
              help="Mask folder (default: RUN/predictions); created when missing, masks of the same name replaced.")
@click.option("--decision", type=click.Choice(["argmax", "cost", "threshold"]), help=DECISION_HELP)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help=THRESHOLD_HELP)
@click.option("--tta/--no-tta", default=None, help=TTA_HELP)
@click.option("--probabilities", is_flag=True, help="Also write the class probabilities (see --probabilities-format).")
@click.option("--probabilities-format", type=click.Choice(["png", "npy"]), default=None,
              help="png (default): <stem>_prob_<class>.png, 8-bit 0..255; npy: <stem>.npy, float32 H x W x K, "
                   "exact. Implies --probabilities.")
@click.option("--overlay", is_flag=True, help="Also write a colour overlay of the mask on the image.")
@run_overrides
def predict(paths, checkpoint, out, decision, threshold, tta, probabilities, probabilities_format, overlay, overrides):
    """Write one mask per image in IMAGES (files or folders) with RUN's model: same stem, same size, training
    encoding.

    RUN is a run folder written by `segtrain fit` (or one of its .keras files)."""
    from segtrain.runs import is_run_path

    decision = _decision_from_options(decision, threshold)
    run, images = _split_run_and_images(paths, checkpoint, is_run_path)
    model_path, run_dir, _ = _open_run("predict", run, checkpoint, overrides, usage="RUN IMAGES...")
    from segtrain.predict import _check_outputs, collect_images

    found = collect_images(list(images))
    out_dir = Path(out) if out else run_dir / "predictions"
    _check_outputs(found, out_dir)
    _import_tensorflow_quietly()
    from segtrain.predict import predict_images

    predict_images(found, str(model_path), out_dir, decision, threshold, tta,
                   probabilities or probabilities_format is not None, overlay,
                   probabilities_format=probabilities_format or "png", overrides=overrides)


def _split_run_and_images(paths, checkpoint, is_run_path):
    """(RUN, IMAGES) from predict's arguments: RUN first, or every argument an image with the old --checkpoint."""
    from segtrain.runs import newest_run_hint

    if checkpoint is not None:
        if paths and is_run_path(paths[0]):
            raise click.UsageError(f"the run is given twice ({paths[0]} and --checkpoint {checkpoint}); pass it "
                                   "once, first: segtrain predict RUN IMAGES...")
        run, images = None, paths
    elif not paths or (Path(paths[0]).exists() and not is_run_path(paths[0])):
        shown = " ".join(paths) or "IMAGES..."
        raise click.UsageError(f"missing RUN: name the run first, segtrain predict RUN {shown} ({newest_run_hint()}).")
    else:
        run, images = paths[0], paths[1:]
    if not images:
        raise click.UsageError("missing IMAGES: name the images (files or folders) after the run, "
                               "segtrain predict RUN IMAGES...")
    return run, images


@cli.command(short_help="Check the data; print class counts and weights.")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value by dotted path.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(config_path, overrides, as_json):
    """Check the data set and print class pixel counts and the weights of every strategy."""
    from segtrain.atomic import json_text
    from segtrain.class_weights import class_stats_dict, format_stats_table
    from segtrain.config import load_config
    from segtrain.data.scan import scan_training_set

    config = load_config(config_path, list(overrides))
    data = config.data
    held = None
    if data.val_fraction is not None:  # count what fit trains on: the images the hold-out leaves
        from segtrain.data.discovery import find_pairs
        from segtrain.data.holdout import make_holdout

        held = make_holdout(data, config.train.seed, None if as_json else "choosing the val images")
        training = held.select(find_pairs(data.root, data.train_split), held_out=False)
    pairs, mapping, _, counter = scan_training_set(data, description=None if as_json else "counting",
                                                   pairs=None if held is None else training)
    result = class_stats_dict(counter, data.classes, config.loss.class_weights, config.loss.max_weight,
                              config.loss.class_weights_from)
    if as_json:
        click.echo(json_text(result))
    else:
        click.echo(f"{data.root}/{data.train_split}: {len(pairs)} pairs checked; masks read as {mapping.describe()}.")
        if held is not None:
            click.echo(f"data.val_fraction {held.fraction:g}: {len(held.val)} images held out for validation as fit "
                       f"holds them out (seed {held.seed}); the counts below are the other {len(pairs)}.")
        click.echo(format_stats_table(result))
        for warning in result.get("warnings", []):
            click.echo(f"warning: {warning}")


@cli.command(short_help="Export a run as SavedModel, ONNX or TFLite.")
@run_argument
@click.option("--format", "fmt", type=click.Choice(["saved_model", "onnx", "tflite"]), default="saved_model",
              show_default=True, help="Model format (onnx and tflite need `pip install segtrain[export]`).")
@click.option("--out", type=click.Path(file_okay=False),
              help="A new folder to export into (default: RUN/export/<format>); refused when it exists and is not "
                   "empty, unless --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing export folder, once the new export is written completely (a failed export "
                   "keeps the old one).")
@run_overrides
def export(run, fmt, out, overwrite, overrides):
    """Export RUN's model with its decision rule and metadata.json.

    RUN is a run folder written by `segtrain fit` (or one of its .keras files)."""
    from segtrain.export import check_export_folder

    model_path, run_dir, _ = _open_run("export", run, overrides=overrides)
    out_dir = Path(out) if out else run_dir / "export" / fmt
    check_export_folder(out_dir, overwrite)
    _import_tensorflow_quietly()
    from segtrain.export import export_run

    export_run(model_path, fmt, out_dir, log=click.echo, overwrite=overwrite, overrides=overrides)


@cli.command(short_help="Fit a run's temperature on a labelled split.")
@run_argument
@click.option("--split", help="Labelled split to fit on (default: the run's data.val_split).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
@run_overrides
def calibrate(run, split, data_root, overrides):
    """Fit temperature scaling (one T, or one per class where that helps on held-out images) for RUN's model on a
    labelled split and store it in RUN/policy.json.

    RUN is a run folder written by `segtrain fit` (or one of its .keras files)."""
    model_path, run_dir, config = _open_run("calibrate", run, overrides=overrides)
    split = _check_split(config, data_root, split, run_dir)
    _import_tensorflow_quietly()
    from segtrain.policy.calibrate import calibrate_run

    calibrate_run(str(model_path), split, data_root, log=click.echo, overrides=overrides)


@cli.command(short_help="Choose a run's operating point on a labelled split.")
@run_argument
@click.option("--split", help="Labelled split to tune on (default: the run's data.val_split; then eval on it is optimistic).")
@click.option("--objective", type=click.Choice(["f1", "iou", "cost"]),
              help="What to maximise: foreground (two classes) or mean F1 / IoU, or least mean cost "
                   "(default: cost when the run has costs, else f1 for two classes, iou for several).")
@click.option("--postprocess/--no-postprocess", default=True, show_default=True,
              help="Also choose per-class post-processing (remove small components, fill small holes).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Data set root (default: the run's data.root).")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="SHARE",
              help="Hold out this share of the split's images (seeded, by file stem) from tuning; `segtrain eval "
                   "RUN --split SPLIT` then reports on them only.")
@click.option("--holdout-seed", type=int, default=0, show_default=True, help="Seed of the --holdout choice.")
@run_overrides
def tune(run, split, objective, postprocess, data_root, holdout, holdout_seed, overrides):
    """Choose RUN's operating point on a labelled split, check it on held-out images of that split, and store it in
    RUN/policy.json when it beats the untuned rule there: the threshold (two classes) or, with
    predict.prior_correction: tuned, the prior-correction tau (and with several classes one bias per class), and
    per class the post-processing. eval, predict and export then apply it.

    RUN is a run folder written by `segtrain fit` (or one of its .keras files)."""
    model_path, run_dir, config = _open_run("tune", run, overrides=overrides)
    split = _check_split(config, data_root, split, run_dir)
    if holdout is not None:  # a share leaving no image on a side: exit 2 before TensorFlow loads
        from segtrain.data.holdout import split_pairs
        from segtrain.policy.tuning import holdout_stems

        holdout_stems([p.stem for p in split_pairs(config, split, run_dir, data_root)], holdout, holdout_seed,
                      repr(split))
    _import_tensorflow_quietly()
    from segtrain.policy.tuning import tune_run

    tune_run(str(model_path), split, objective, postprocess, data_root, log=click.echo, overrides=overrides,
             holdout=holdout, holdout_seed=holdout_seed)


@cli.command(short_help="Write a config planned from the data set itself.")
@click.argument("data_root", metavar="DATA_ROOT", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False, allow_dash=True), metavar="CONFIG",
              help="Config file to write; never replaced (default: configs/<DATA_ROOT's folder name>.yaml under the "
                   "working directory; - prints it).")
@click.option("--budget", default="20m", show_default=True, metavar="DURATION",
              help="Training time to plan for: 20m, 1h30m, 90s (a bare number is minutes).")
@click.option("--ignore", "ignore", multiple=True, metavar="VALUE",
              help="A raw mask value (or an R,G,B colour) that counts in no loss and no metric, e.g. 255 (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), help="Device to plan for (default: gpu when one is visible).")
@click.option("--memory", metavar="SIZE",
              help="Memory training may use, e.g. 16GB (default: on the CPU 25% of the RAM, at most 8GB; on a GPU "
                   "its memory).")
def plan(data_root, out, budget, ignore, device, memory):
    """Read the data set at DATA_ROOT once and write a config whose every value comes with the fact it follows from."""
    from segtrain.errors import ConfigError
    from segtrain.planning.fingerprint import fingerprint
    from segtrain.planning.plan import make_plan
    from segtrain.planning.units import parse_budget, parse_ignore, parse_memory
    from segtrain.planning.writer import render, write_plan

    def parsed(parse, text, option):
        try:
            return parse(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    seconds = parsed(parse_budget, budget, "--budget")
    memory_bytes = None if memory is None else parsed(parse_memory, memory, "--memory")
    ignored = [parsed(parse_ignore, value, "--ignore") for value in ignore]
    path = None if out == "-" else Path(out) if out else Path("configs") / f"{Path(data_root).resolve().name}.yaml"
    if path is not None and path.exists():
        raise ConfigError(f"{path}: already exists; `segtrain plan` never replaces a config. Pass another --out "
                          "(or --out - to print it), or move the file away.")
    result = make_plan(fingerprint(Path(data_root), ignore=ignored), device, memory_bytes, seconds)
    if path is None:
        click.echo(render(result), nl=False)
        return
    write_plan(result, path)
    fp = result.fingerprint
    click.echo(f"Wrote {path}: planned from {fp.pairs} pairs in {fp.seconds:.1f} s. Train it: segtrain fit {path}")
    for note in result.notes:
        click.echo(f"note: {note}")


@cli.command(short_help="Write a run's report: one self-contained HTML page.")
@run_argument
@click.option("--out", type=click.Path(dir_okay=False), metavar="FILE",
              help="The HTML file to write (default: RUN/report.html); its folder must exist.")
def report(run, out):
    """Write one self-contained HTML page of RUN: config, data set statistics, training curves, per-class table,
    plots, worst images, decision policy, timings and every eval folder's results. It opens offline (pictures
    inlined, no scripts); fit writes it at its end and eval refreshes it.

    RUN is a run folder written by `segtrain fit`."""
    from segtrain.html_report import write_report
    from segtrain.runs import newest_run_hint

    if run is None:
        raise click.UsageError(f"missing RUN: name the run, segtrain report RUN ({newest_run_hint()}).")
    click.echo(f"Wrote {write_report(run, out)}")


@cli.command(short_help="Compare runs: a table and an HTML page.")
@click.argument("runs", nargs=-1, metavar="RUN RUN...", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), metavar="FILE",
              help="The HTML page to write (default: compare.html in the working directory); its folder must exist.")
@click.option("--sort", "sort_key", metavar="KEY",
              help="Order the rows by a column of the table, e.g. mean_iou, iou_road, f1_road, time, steps "
                   "(IoU and F1 best first, the others ascending).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON (full precision) instead.")
def compare(runs, out, sort_key, as_json):
    """Compare runs side by side: mean IoU, each class's IoU and F1, steps, budget and time used, the decision
    policy, the config keys that differ, and (on the HTML page) the training curves overlaid.

    RUN is a run folder written by `segtrain fit`; name two or more."""
    from segtrain.compare import DEFAULT_OUT, compare_runs, comparison_json, format_comparison, write_comparison
    from segtrain.html_report import check_out_file

    if len(runs) < 2:
        raise click.UsageError(f"compare needs two or more runs, segtrain compare RUN RUN... (given {len(runs)}); "
                               "for one run, segtrain report RUN writes its page.")
    out = check_out_file(Path(out) if out else DEFAULT_OUT)
    comparison = compare_runs(runs, sort_key)
    click.echo(comparison_json(comparison) if as_json else format_comparison(comparison))
    click.echo(f"Wrote {write_comparison(comparison, out)}", err=as_json)


def _decision_from_options(decision, threshold):
    """--threshold implies --decision threshold and makes no sense with another rule."""
    if threshold is None:
        return decision
    if decision not in (None, "threshold"):
        raise click.UsageError(f"--threshold goes with --decision threshold, not --decision {decision}.")
    return "threshold"


def main():
    """Console-script entry point."""
    cli(prog_name="segtrain")


if __name__ == "__main__":
    main()
