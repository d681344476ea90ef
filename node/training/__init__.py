"""Local training: DP-SGD over the intake's cache, the update vector a round sends, and validation
metrics."""
