"""`segtrain plan DATA_ROOT`: a config planned from the data set itself (nnU-Net's experiment planner is the model).

The modules import downward only, from the bottom up:

- `units.py`: the command line's values (a time budget, a memory size, a mask value to ignore);
- `raw.py`: the raw-mask pass (image headers, raw mask values and their shares: `RawMasks`);
- `encoding.py`: `Decision` (a chosen value and the fact it came from) and the mask-encoding rules (which raw values
  are ignored, how the others become classes, their names);
- `fingerprint.py`: the statistics pass over the training split (image sizes, channels, sample type, intensity
  percentiles; per class: pixel frequency, per-image presence, object sizes and thickness, where it sits in the
  image, how often a random crop holds it), after `raw` and `encoding`: the `Fingerprint`;
- `resources.py`: the device, memory and time model;
- `rules.py`: the other settings' rules, one named function per decision, over the fingerprint and the device,
  memory and time budget;
- `plan.py` runs them all into a `Plan`, and `writer.py` renders it as a commented YAML config that
  `segtrain.config.load_config` reads.

Nothing here imports TensorFlow.
"""
