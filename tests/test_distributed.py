"""Multi-process training: shards, shared permutation, gradient equivalence, and a torchrun run."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from eanet import checkpoint
from eanet.data.augment import AugmentConfig
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import ConfigError
from eanet.metrics import Metrics
from eanet.models.registry import create_model
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.distributed import Distributed, setup
from eanet.train.loop import fit
from eanet.train.step import train_step

# Dropout and augmentation off: the only randomness left is the data order, which a
# distributed run shares with a single process, so the two must reach the same weights.
DETERMINISTIC = {
    "depth": 1,
    "dim": 32,
    "mlp_dim": 32,
    "attn_drop": 0.0,
    "proj_drop": 0.0,
    "mlp_drop": 0.0,
}
WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_without_torchrun_everything_is_single_process(no_torchrun):
    d = setup("cpu")
    assert (d.enabled, d.rank, d.world_size, d.is_main) == (False, 0, 1, True)
    assert not tdist.is_initialized()
    model = create_model("eanet-cifar", **DETERMINISTIC)
    assert d.wrap(model) is model
    x, y = torch.zeros(5, 3, 32, 32), torch.arange(5)
    assert d.eval_shard(x, y) == (x, y)
    m = Metrics(1.5, 0.25, 0.5, 8)
    assert d.all_reduce(m) is m
    torch.manual_seed(3)
    with d.epoch_rng(seed=0, epoch=1):  # no stream switching in one process
        a = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(2))
    assert d.from_main(lambda v: v + 1, 1) == 2
    d.check_batch(7)  # any batch splits among 1 process


def test_global_batch_must_split_evenly():
    Distributed(rank=0, world_size=4, enabled=True).check_batch(32)
    with pytest.raises(ConfigError, match="--batch-size 30 is the global batch.*4 processes"):
        Distributed(rank=0, world_size=4, enabled=True).check_batch(30)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("size", [12, 7, 2, 1])
def test_shards_are_contiguous_and_cover_the_global_batch(world, size):
    idx = torch.randperm(40)[:size]
    parts = [Distributed(rank=r, world_size=world, enabled=True).shard(idx) for r in range(world)]
    real = [part for part, weight in parts if weight > 0]
    assert torch.equal(torch.cat(real), idx)  # in order: rank 0's share first
    assert max(len(p) for p in real) - min(len(p) for p in real) <= 1
    if size % world == 0:
        assert all(weight == 1.0 for _, weight in parts)
    for part, weight in parts:
        if weight == 0:  # no image of its own: a stand-in, counted nowhere
            assert len(part) == 1


@pytest.mark.parametrize(("world", "size"), [(2, 8), (2, 5), (3, 7), (4, 2)])
def test_rank_gradients_average_to_the_global_batch_gradient(sample_data, world, size):
    """DDP averages the ranks' gradients; the shard weights make that the global mean's."""
    torch.manual_seed(0)
    model = create_model("eanet-cifar", **DETERMINISTIC)
    cfg = TrainConfig(model_args=DETERMINISTIC, augment="none", device="cpu")
    x, y = sample_data.train_images[:size], sample_data.train_labels[:size]

    def grads(idx, scale):
        net = copy.deepcopy(model).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # keep the weights, read the grads
        train_step(net, opt, x[idx], y[idx], cfg, AugmentConfig(), loss_scale=scale)
        return [p.grad.clone() for p in net.parameters()]

    expected = grads(torch.arange(size), 1.0)
    per_rank = [
        grads(*Distributed(rank=r, world_size=world, enabled=True).shard(torch.arange(size)))
        for r in range(world)
    ]
    averaged = [sum(g) / world for g in zip(*per_rank, strict=True)]
    # fp32 sums in another order (the kernels block by batch size): on the AMX Xeon of
    # 2026-12-02 up to 1e-5 apart on gradients of about 1; a wrong weight is off by >1e-2
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_ranks_share_the_permutation_and_not_the_augmentation_stream():
    n = 389
    torch.manual_seed(0)
    single_perm = torch.randperm(n)  # what one process draws at the start of an epoch
    after_epoch = torch.get_rng_state()
    draws = {}
    for rank in (0, 1, 0):
        d = Distributed(rank=rank, world_size=2, enabled=True)
        torch.manual_seed(0)
        with d.epoch_rng(seed=0, epoch=1):
            assert torch.equal(d.permutation(n, torch.device("cpu")), single_perm)
            draw = torch.rand(4)  # augmentation and dropout draw from the rank's own stream
        assert torch.equal(torch.get_rng_state(), after_epoch)  # shared stream: perm only
        if rank in draws:
            assert torch.equal(draws[rank], draw)  # reproducible: resuming stays exact
        draws[rank] = draw
    assert not torch.equal(draws[0], draws[1])
    with pytest.raises(RuntimeError, match="inside epoch_rng"):
        Distributed(rank=0, world_size=2, enabled=True).permutation(n, torch.device("cpu"))


def test_a_process_group_of_the_callers_own_is_used_and_left_alone(no_torchrun):
    # An in-process store: a group of one needs no file or socket to meet in.
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        d = setup("cpu")
        assert (d.enabled, d.owned, d.world_size, d.describe()["backend"]) == (
            True,
            False,
            1,
            "gloo",
        )
        torch.manual_seed(0)
        model = create_model("eanet-cifar", **DETERMINISTIC)
        model.normalize.set_stats(torch.full((3,), 120.0), torch.full((3,), 4000.0), 1)
        net = d.wrap(model)
        assert net is not model and net.config is model.config  # lent by the wrapper
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        y = torch.zeros(4, dtype=torch.long)
        out, _ = BatchAugment("reference-bug")(net, x, y)  # uses net.normalize
        assert out.shape == (4, 100)
        m = d.all_reduce(Metrics(2.0, 0.25, 0.75, 4))
        assert (m.loss, m.top1, m.top5, m.count) == pytest.approx((2.0, 0.25, 0.75, 4))
        assert d.from_main(lambda: "rank 0's answer") == "rank 0's answer"
        del net  # before the group goes (a DDP freed after it can deadlock: Distributed.close)
        d.close()
        assert tdist.is_initialized()  # not ours to destroy
    finally:
        tdist.destroy_process_group()


def test_fit_frees_its_ddp_wrapper_before_closing_the_group(tmp_path, small_sample, no_torchrun):
    """A DDP reducer freed after its group was destroyed joined gloo's threads holding the
    GIL while one of them waited for it: a hang. `fit` frees the wrapper first."""
    wrappers, alive_at_close = [], []
    wrap, close = Distributed.wrap, Distributed.close

    def recording_wrap(self, model):
        net = wrap(self, model)
        wrappers.append(weakref.ref(net))
        return net

    def recording_close(self):
        alive_at_close.append([ref() is not None for ref in wrappers])
        close(self)

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Distributed, "wrap", recording_wrap)
            mp.setattr(Distributed, "close", recording_close)
            cfg = TrainConfig(model_args=DETERMINISTIC, epochs=1, batch_size=32, device="cpu")
            fit(cfg, tmp_path / "run", data=small_sample, progress=False)
        assert alive_at_close == [[False]]  # one wrapper, already gone when the group closes
    finally:
        tdist.destroy_process_group()


# --------------------------------------------------------------------------- torchrun


def _torchrun(tmp_path: Path, name: str, args: list[str]) -> dict[int, dict]:
    """`torchrun --standalone --nproc_per_node 2 -m eanet ARGS` (via the recording worker)."""
    record = tmp_path / f"record-{name}"
    record.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, str(WORKER), str(record), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a stuck launch can be killed with its workers
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    ranks = {r: json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert [ranks[r]["rc"] for r in (0, 1)] == [0, 0]
    return ranks


def _wrote_in(rank: dict, run: Path) -> set[str]:
    """What a rank created, changed or removed in the run directory (or the directory)."""
    run = run.resolve()
    paths = (Path(p).resolve() for p in rank["written"])
    return {str(p.relative_to(run)) for p in paths if p == run or run in p.parents}


def _epoch_lines(rank: dict) -> list[str]:
    """The per-epoch and test log lines without their timings (which differ per rank)."""
    lines = [m for m in rank["log"] if m.startswith(("epoch ", "test loss"))]
    return [re.sub(r" \| [\d.]+s [\d.]+ img/s$", "", m) for m in lines]


def _close(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, sample_data):
    """2 gloo processes on the CLI path: same weights as one process, global metrics, rank 0 files.

    Global batch 32 (16 per rank) on the 437 training images of the shipped slice (a tenth
    held out): 13 full steps and a short last batch of 21 (11 + 10 images, weighted). Epoch
    1 runs fresh under torchrun, epoch 2 is a torchrun `--resume`, which every rank restores.
    """
    threads = torch.get_num_threads()
    cfg = TrainConfig(
        model_args=DETERMINISTIC,
        epochs=2,
        batch_size=32,
        augment="none",
        val_fraction=0.1,  # an odd training set: the last batch splits unevenly
        device="cpu",
        threads=1,  # as each torchrun process (OMP_NUM_THREADS=1)
    )
    t0 = time.perf_counter()
    try:
        single = fit(cfg, tmp_path / "single", data=sample_data, progress=False)
    finally:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    run = tmp_path / "ddp"
    model_args = [a for k, v in DETERMINISTIC.items() for a in ("--model-arg", f"{k}={v}")]
    common = ["--threads", "1", "--no-progress"]
    first = _torchrun(
        tmp_path,
        "fresh",
        [
            "train",
            *("--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5),
            *model_args,
            *("--augment", "none", "--batch-size", "32", "--epochs", "1", "--device", "cpu"),
            *("--val-fraction", "0.1"),
            *("--out", str(run), *common),
        ],
    )
    after_first = json.loads((run / "history.json").read_text())
    second = _torchrun(
        tmp_path, "resume", ["train", "--resume", str(run), "--epochs", "2"] + common
    )
    t2 = time.perf_counter()

    # Only rank 0 wrote into the run directory, every time.
    for ranks in (first, second):
        assert _wrote_in(ranks[1], run) == set()
        assert {"checkpoint.safetensors", "history.json", "metrics.json"} <= _wrote_in(
            ranks[0], run
        )
        # Every rank logged the same (global) epoch figures.
        assert _epoch_lines(ranks[0]) == _epoch_lines(ranks[1]) and _epoch_lines(ranks[0])
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}

    # The weights and Adam moments of 2 x 16 equal those of 1 x 32, after a resume.
    a, b = checkpoint.load(tmp_path / "single"), checkpoint.load(run)
    assert a.model_state.keys() == b.model_state.keys()  # the unwrapped model: no "module."
    diffs = {k: (a.model_state[k] - b.model_state[k]).abs().max().item() for k in a.model_state}
    for idx, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            other = b.optimizer_state["state"][idx][name]
            torch.testing.assert_close(other, value, atol=1e-6, rtol=1e-4)
    # Softmax over the tokens ignores a constant per memory slot, so these three get a zero
    # gradient: float noise (~1e-10) that Adam (eps 1e-7) turns into steps of ~1e-6 that
    # differ run to run. They drift apart (~1e-4) without changing what the model computes.
    free = ("blocks.0.norm1.bias", "blocks.0.attn.proj_in.bias", "blocks.0.attn.mk.bias")
    models = [checkpoint.load_model(path)[0] for path in (tmp_path / "single", run)]
    names = [n for n, p in models[0].named_parameters() if p.requires_grad]  # optimizer order
    for name in free:
        assert a.optimizer_state["state"][names.index(name)]["exp_avg_sq"].max() < 1e-16
    diff = max(v for k, v in diffs.items() if k not in free)
    with torch.no_grad():
        logits = [model(sample_data.test_images[:256]) for model in models]
    out_diff = (logits[0] - logits[1]).abs().max().item()
    print(
        f"max |weight diff| {diff:.2e} (all tensors {max(diffs.values()):.2e}), max |logit diff| "
        f"{out_diff:.2e}; single {t1 - t0:.1f}s, 2 torchrun launches {t2 - t1:.1f}s"
    )
    assert diff < 1e-5
    assert out_diff < 1e-5

    # The logged figures are the global ones: they match the single process's.
    history = json.loads((run / "history.json").read_text())
    assert history[0] == after_first[0]
    figures = ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5")
    for got, want in zip(history, a.meta.history, strict=True):
        _close(got, want, figures)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == single["test_images"] == 916  # both ranks' halves
    _close(metrics, single, ("test_loss", "test_top1", "test_top5", "best_val_top1"))
