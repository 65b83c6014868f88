"""U-Nets on pretrained `keras.applications` backbones (`model.encoder`)."""
