"""`eanet evaluate` in its three steps: resolve the data, score, write the reports."""

import json

import pytest
import torch

from eanet import checkpoint
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.dataset import ImageData
from eanet.data.splits import train_val_split
from eanet.errors import ConfigError
from eanet.evaluate import (
    EvalData,
    EvalRequest,
    evaluate_checkpoint,
    resolve_data,
    score,
    write_reports,
)
from eanet.inference import Runtime, predict_logits
from eanet.metrics import metrics_from_logits


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, ckpt = checkpoint.load_model(tiny_run, torch.device("cpu"))
    return model, ckpt


def test_the_request_names_its_files_and_their_folder(tiny_run, tmp_path):
    assert EvalRequest(tiny_run).tag == "test"
    assert EvalRequest(tiny_run, split="val", weights="best").tag == "val_best"
    assert EvalRequest(tiny_run).report_dir == tiny_run
    assert EvalRequest(tiny_run / "checkpoint.safetensors").report_dir == tiny_run
    assert EvalRequest(tiny_run, out_dir=tmp_path).report_dir == tmp_path


def test_the_data_is_the_checkpoints_split(tiny_run, small_sample, loaded):
    model, ckpt = loaded
    test = resolve_data(EvalRequest(tiny_run), ckpt, model, small_sample)
    assert test.dataset == "cifar100" and test.class_names == small_sample.class_names
    assert torch.equal(test.images, small_sample.test_images)
    val = resolve_data(EvalRequest(tiny_run, split="val"), ckpt, model, small_sample)
    _, _, val_x, val_y = train_val_split(small_sample, 0.2)  # the run's val_fraction
    assert torch.equal(val.images, val_x) and torch.equal(val.labels, val_y)
    with pytest.raises(ConfigError, match="split 'train' must be 'test' or 'val'"):
        resolve_data(EvalRequest(tiny_run, split="train"), ckpt, model, small_sample)


def test_the_data_set_is_loaded_from_the_request_or_refused(tiny_run, small_sample, loaded):
    model, ckpt = loaded
    request = EvalRequest(tiny_run, data_path=str(SAMPLE_ARCHIVE), md5=SAMPLE_MD5, progress=False)
    data = resolve_data(request, ckpt, model)
    assert data.dataset == "cifar100" and len(data.images) == 916  # the whole shipped slice
    x, y = small_sample.test_images, small_sample.test_labels % 10
    other = ImageData("digits", [str(i) for i in range(10)], x, y, x, y)
    with pytest.raises(ConfigError, match="trained on 100 classes that are not digits's 10"):
        resolve_data(EvalRequest(tiny_run, dataset="digits"), ckpt, model, other)


def test_score_is_the_runtimes_logits_through_the_metrics(tiny_run, small_sample, loaded):
    model, ckpt = loaded
    x, y = small_sample.test_images[:20], small_sample.test_labels[:20]
    data = EvalData("cifar100", small_sample.class_names, x, y)
    request = EvalRequest(tiny_run, batch_size=7, progress=False)
    s = score(request, Runtime.resolve("cpu", "fp32", False), model, data, 0.1)
    want = metrics_from_logits(predict_logits(model, data.images), data.labels, 0.1)
    assert s.metrics.count == 20 and s.metrics.top1 == want.top1
    assert s.metrics.loss == pytest.approx(want.loss, abs=1e-6)
    assert s.confusion.shape == (100, 100) and int(s.confusion.sum()) == 20


def test_the_reports_and_the_result_are_evaluate_checkpoints(tiny_run, small_sample, tmp_path):
    result = evaluate_checkpoint(
        tiny_run, data=small_sample, out_dir=tmp_path / "a", progress=False, weights="best"
    )
    model, ckpt = checkpoint.load_model(tiny_run, torch.device("cpu"), "best")
    request = EvalRequest(tiny_run, out_dir=tmp_path / "b", progress=False, weights="best")
    data = resolve_data(request, ckpt, model, small_sample)
    rt = Runtime.resolve("auto", "fp32", True, False)
    parts = write_reports(request, data, score(request, rt, model, data, 0.1))
    assert [f.replace("/b/", "/a/") for f in parts["files"]] == result["files"]
    assert {k: v for k, v in parts.items() if k != "files"} == {
        k: v for k, v in result.items() if k != "files"
    }
    names = ["per_class_test_best.csv", "confusion_test_best.png", "evaluation_test_best.json"]
    assert result["files"] == [str(tmp_path / "a" / n) for n in names]
    saved = json.loads((tmp_path / "a" / "evaluation_test_best.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "files"}
    assert saved["checkpoint"] == str(tiny_run / checkpoint.BEST_NAME)
    rows = (tmp_path / "a" / "per_class_test_best.csv").read_text().splitlines()
    assert rows[0] == "class,name,images,correct,accuracy" and len(rows) == 101


def test_an_unknown_option_is_refused(tiny_run):
    with pytest.raises(TypeError, match="splits"):
        evaluate_checkpoint(tiny_run, splits="test")
