"""`eanet.serve.model`: under --precision auto on a CPU, the passes too small for bf16 to
pay run in fp32 (timed at start), the larger ones in bf16."""

import pytest
import torch

from eanet import runtime
from eanet.serve import model as served_model
from eanet.serve.model import ServedModel, bf16_from

SIZES = (1, 2, 4, 8, 16)


def _timer(bf16_wins: set[int]):
    """seconds(images, precision): bf16 faster exactly at the sizes in `bf16_wins`."""

    def seconds(images: int, precision: str) -> float:
        fast = (precision == "bf16") == (images in bf16_wins)
        return images * (1.0 if fast else 2.0)

    return seconds


@pytest.mark.parametrize(
    ("wins", "expected"),
    [
        ({4, 8, 16}, 4),
        ({1, 8, 16}, 8),  # a win at 1 below a loss at 2 and 4 does not count
        ({1, 2, 4, 8, 16}, 1),
        (set(), None),
        ({1, 2, 4, 8}, None),  # bf16 lost at the largest size timed
    ],
)
def test_bf16_from_is_where_bf16_wins_from_there_on(wins, expected):
    assert bf16_from(_timer(wins), SIZES) == expected


def test_every_size_is_timed_in_both_precisions_alternating():
    calls = []
    bf16_from(lambda n, p: calls.append((n, p)) or 1.0, (1, 2))
    assert calls == [(1, "fp32"), (1, "bf16")] * 4 + [(2, "fp32"), (2, "bf16")] * 4


def _served(tiny_run, monkeypatch, wins: set[int], precision: str = "auto", max_batch: int = 64):
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: True)  # as on a bf16 CPU
    timed = []
    timer = _timer(wins)

    def seconds(self, images, p):
        timed.append(images)
        return timer(images, p)

    monkeypatch.setattr(served_model.ServedModel, "_seconds", seconds)
    return ServedModel(tiny_run, "cpu", precision, max_batch=max_batch), timed


def test_auto_runs_small_passes_in_fp32_and_large_ones_in_bf16(tiny_run, monkeypatch):
    served, timed = _served(tiny_run, monkeypatch, {4, 8, 16})
    assert served.precision == "bf16" and served.bf16_from == 4
    assert sorted(set(timed)) == list(SIZES)
    assert [served.pass_precision(n) for n in (1, 3, 4, 64)] == ["fp32", "fp32", "bf16", "bf16"]
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        fp32 = served.model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = served.model(x).float()
    assert not torch.allclose(fp32, bf16, atol=1e-6, rtol=0)  # the two precisions differ
    torch.testing.assert_close(served.forward(x[:2]), fp32[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.forward(x), bf16, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.forward(x[:2]), fp32[:2], atol=1e-5, rtol=1e-5)  # again


def test_auto_where_bf16_never_wins_is_fp32_and_times_only_up_to_max_batch(tiny_run, monkeypatch):
    served, timed = _served(tiny_run, monkeypatch, {4, 8, 16}, max_batch=2)
    assert served.precision == "fp32" and served.bf16_from is None
    assert sorted(set(timed)) == [1, 2]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_an_explicit_precision_is_kept_for_every_pass_and_nothing_is_timed(
    tiny_run, monkeypatch, precision
):
    served, timed = _served(tiny_run, monkeypatch, set(), precision)
    assert served.precision == precision and served.bf16_from is None and timed == []
    assert served.pass_precision(1) == served.pass_precision(64) == precision


def test_the_real_timing_runs_and_chooses_a_timed_size(tiny_run, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_bf16_pays", lambda: True)
    with caplog.at_level("INFO", logger="eanet.serve.model"):
        served = ServedModel(tiny_run, "cpu", "auto", max_batch=8)
    assert served.bf16_from in (None, 2, 4, 8)
    assert (served.precision == "fp32") == ("(none timed)" in caplog.text)
    assert "--precision auto: bf16 from passes of" in caplog.text and "timed 1/2/4/8" in caplog.text
