"""Data: finding image/mask pairs, mapping mask values to classes, checking them, and tf.data."""
