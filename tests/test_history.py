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
