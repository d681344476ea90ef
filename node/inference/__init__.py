"""Point-of-care inference: ONNX Runtime over the intake's preprocessing, from the command line
and over HTTP."""
