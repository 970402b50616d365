"""The user-facing side of the pipeline: the command line. It never imports torch at import time."""
