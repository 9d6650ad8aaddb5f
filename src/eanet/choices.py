"""The closed sets of values that options take, importable without torch.

The command line builds its parser and prints `--help` from these (and the config
dataclasses) without loading torch; the modules that act on a value import it from here.
"""

PRECISIONS = ("fp32", "bf16", "auto")  # how forward passes compute (eanet.runtime)
# eanet.data.load
DATASET_NAMES = ("cifar100", "cifar10", "fashion-mnist", "folder", "digits", "synthetic")
WEIGHTS = ("last", "best", "ema")  # which weights of a run `checkpoint.load_model` rebuilds
ON_NONFINITE = ("stop", "skip")  # what a NaN/inf training loss does (eanet.train.guard)
