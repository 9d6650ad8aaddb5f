"""Config values that would over-allocate or run for ever are one line, before any work.

Each case is a value a config file or a flag can carry (a typo such as 1e12 for 1e2) that
would otherwise end in a traceback (a seed of 1e26, 10^12 synthetic images), an out-of-memory
crash (dim=100000) or a run that never ends (depth=1e9); an infinite LayerNorm epsilon is no
epsilon; and an invalid model option must be reported before the data set is looked for.
"""

from __future__ import annotations

import pytest

from eanet.cli.main import main
from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.train.config import TrainConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 100_000}, "dim=100000 is over its bound"),
        ({"depth": 10**9}, "depth=1000000000 is over its bound"),
        ({"ln_eps": float("inf")}, "ln_eps=inf must be a finite number"),
        ({"memory_size": 10**7}, "memory_size=10000000 must be in"),
        ({"dim": 8192, "depth": 1024}, "parameters, over the bound"),
    ],
)
def test_model_options_beyond_any_machine_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "synthetic", "synthetic_images": 10**12}, "--synthetic-images"),
        ({"seed": 10**26}, "--seed"),
        ({"seed": -1}, "--seed"),
        ({"epochs": 10**12}, "--epochs"),
        ({"batch_size": 10**9}, "--batch-size"),
        ({"adam_eps": float("nan")}, "--adam-eps"),
    ],
)
def test_training_options_beyond_any_machine_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_every_registered_model_is_within_the_bounds():
    from eanet.models.registry import MODELS

    for entry in MODELS.values():
        entry.config.validate()  # raises if a registered model broke a bound


def test_an_invalid_model_option_is_reported_before_the_data_is_looked_for(
    tmp_path, capsys, monkeypatch
):
    """No CIFAR-100 archive in the data cache: the model option's error must come before any
    download is tried."""
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("a download was tried before the model options were checked")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    assert main(["train", "--model-arg", "dim=100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dim=100000 is over its bound" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
