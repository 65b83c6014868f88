"""The after-training side: logits -> the decision policy -> masks (inference, calibration, prior correction,
rules, post-processing, tuning). Modules import downward only; see each module."""
