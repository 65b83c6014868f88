from segtrain.history import is_better, read_history, write_history


def test_history_round_trip_and_resume_cut(tmp_path):
    path = tmp_path / "history.csv"
    rows = [{"epoch": 1, "loss": 0.5, "val_mean_iou": None}, {"epoch": 2, "loss": 0.25, "val_mean_iou": 0.75}]
    write_history(rows, path)
    assert path.read_text().splitlines() == ["epoch,loss,val_mean_iou", "1,0.5,", "2,0.25,0.75"]
    assert [row["epoch"] for row in read_history(path, upto_epoch=1)] == ["1"]
    assert read_history(tmp_path / "missing.csv", 3) == []


def test_best_rule_direction():
    assert is_better("val_mean_iou", 0.6, 0.5) and not is_better("val_mean_iou", 0.4, 0.5)
    assert is_better("val_loss", 0.4, 0.5) and not is_better("val_loss", 0.6, 0.5)
    assert is_better("val_iou_road", 0.1, None)
    assert not is_better("val_iou_road", float("nan"), 0.1) and not is_better("val_iou_road", None, 0.1)


def test_best_rule_by_column_kind_not_substring():
    """Class names that contain `loss` or `cost` do not turn their IoU/Dice columns into losses."""
    from segtrain.config import monitor_columns

    classes = ["background", "gloss", "blossom", "cost", "loss"]
    for column in monitor_columns(classes):
        lower = column in ("loss", "val_loss")  # the only losses; every other column is a score
        assert is_better(column, 0.4, 0.5) is lower, column
        assert is_better(column, 0.6, 0.5) is not lower, column


def test_best_epoch_follows_the_highest_iou_of_a_class_named_gloss():
    """The best-so-far rule as train.py applies it picks the epoch an independent max picks."""
    values = [0.2, 0.7, 0.4, 0.9, 0.3]
    best, best_epoch = None, None
    for epoch, value in enumerate(values, start=1):
        if is_better("val_iou_gloss", value, best):
            best, best_epoch = value, epoch
    assert best_epoch == 1 + max(range(len(values)), key=values.__getitem__)


def test_best_rule_refuses_a_column_of_unknown_direction():
    import pytest

    with pytest.raises(ValueError, match="val_glossary"):
        is_better("val_glossary", 0.4, 0.5)
