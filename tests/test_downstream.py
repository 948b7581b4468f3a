"""Conv2Former in torchvision's Mask R-CNN and segmentation_models_pytorch's UPerNet (conv2former/downstream.py):
built from one of our exports, trained a few steps on sets made here from the demo's shape renderer (whose masks are
known), read through the libraries' own readers (torchvision's CocoDetection on a COCO-format file)."""

import io
import json
import random
from pathlib import Path

import fsspec
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from safetensors.torch import load_file
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

import conv2former.model  # noqa: F401
from conv2former import downstream
from conv2former.config import TrainConfig, to_dict
from conv2former.errors import UserError
from conv2former.export import write_export
from data_prep.demo import SHAPES, render_with_mask

VARIANT = "conv2former_demo"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An export of a demo model with a 40-class head and non-default weights."""
    torch.manual_seed(0)
    model = timm.create_model(VARIANT, num_classes=40)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = TrainConfig()
    cfg.model.variant = VARIANT
    folder = write_export(
        str(tmp_path_factory.mktemp("run")), model.state_dict(), [f"n{i:08d}" for i in range(40)], to_dict(cfg)
    )
    return Path(folder)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    """A COCO-format instance set: 8 renderer images, one shape each, category = the shape (1..5), its mask as
    compressed RLE and its box from the mask."""
    root = tmp_path_factory.mktemp("coco")
    rng = random.Random(0)
    images, annotations = [], []
    for i in range(8):
        class_index = i % 10
        data, mask = render_with_mask(class_index, rng)
        (root / f"{i}.jpg").write_bytes(data)
        h, w = mask.shape
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, bw, bh = coco_mask.toBbox(rle).tolist()
        images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": class_index % len(SHAPES) + 1,
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": float(coco_mask.area(rle)),
                "bbox": [x, y, bw, bh],
            }
        )
    categories = [{"id": k + 1, "name": shape} for k, shape in enumerate(SHAPES)]
    (root / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def test_backbones_load_the_export_exactly_and_a_wrong_variant_is_one_line(export):
    weights = timm.create_model(VARIANT, num_classes=40)
    weights.load_state_dict(load_file(export / "model.safetensors"))
    expected = {k: v for k, v in weights.state_dict().items() if not k.startswith(("head.", "pred."))}
    body = downstream.feature_backbone(VARIANT, str(export))
    seg = downstream.upernet(VARIANT, classes=3, export=str(export))
    det = downstream.mask_rcnn(VARIANT, num_classes=6, export=str(export))
    for features in (body, seg.encoder.model, det.backbone.body):
        state = features.state_dict()
        assert {k.removeprefix("model."): k for k in state}.keys() == expected.keys()
        assert all(torch.equal(state["model." + k], v) for k, v in expected.items())
    # a remote export (fsspec) loads the same
    mem = fsspec.filesystem("memory")
    mem.put(str(export / "model.safetensors"), "/exports/demo/model.safetensors")
    remote = downstream.feature_backbone(VARIANT, "memory://exports/demo").state_dict()
    assert all(torch.equal(remote[k], v) for k, v in body.state_dict().items())
    with pytest.raises(UserError) as err:
        downstream.feature_backbone("conv2former_n", str(export))
    assert "\n" not in str(err.value) and "conv2former_n" in str(err.value)


def test_layer_decay_groups_cover_the_detector_once_with_the_backbone_by_depth(export):
    det = downstream.mask_rcnn(VARIANT, num_classes=6, export=str(export))
    groups = downstream.backbone_param_groups(det, det.backbone.body, weight_decay=0.05, decay=0.8, lr=1e-4)
    params = [id(p) for g in groups for p in g["params"]]
    assert sorted(params) == sorted(id(p) for p in det.parameters()) and len(set(params)) == len(params)
    by_name = {id(p): n for n, p in det.named_parameters()}
    for g in groups:
        names = [by_name[id(p)] for p in g["params"]]
        assert g["backbone"] == all(n.startswith("backbone.body.") for n in names)
        assert g["lr"] == pytest.approx(1e-4 * g["lr_scale"])
        assert g["lr_scale"] == pytest.approx(1.0 if not g["backbone"] else 0.8 ** (13 - g["depth_group"]))
        if g["weight_decay"] == 0.05:
            assert all(by_name[id(p)].endswith("weight") and p.ndim > 1 for p in g["params"])
    stem = next(g for g in groups if g["backbone"] and g["depth_group"] == 0)
    assert stem["lr_scale"] == pytest.approx(0.8**13)


def _falls(losses) -> bool:
    return float(np.mean(losses[-4:])) < 0.7 * float(np.mean(losses[:4]))


@pytest.mark.slow
def test_mask_rcnn_trains_on_a_coco_format_set(export, coco_set):
    torch.manual_seed(0)
    dataset = wrap_dataset_for_transforms_v2(
        CocoDetection(
            str(coco_set),
            str(coco_set / "instances.json"),
            transforms=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        ),
        target_keys={"boxes", "labels", "masks"},
    )
    _, first = dataset[0]
    assert first["masks"].shape[0] == 1 and first["labels"].tolist() == [1] and first["masks"].any()
    model = downstream.mask_rcnn(VARIANT, num_classes=len(SHAPES) + 1, export=str(export), min_size=96, max_size=128)
    groups = downstream.backbone_param_groups(model, model.backbone.body, weight_decay=0.05, decay=0.8, lr=3e-4)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for step in range(16):
        batch = [dataset[(2 * step + k) % len(dataset)] for k in range(2)]
        loss_dict = model([image for image, _ in batch], [target for _, target in batch])
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(np.isfinite(losses)) and _falls(losses), losses


@pytest.mark.slow
def test_upernet_trains_on_shape_masks(export):
    torch.manual_seed(0)
    rng = random.Random(1)
    images, masks = [], []
    for i in range(8):
        data, mask = render_with_mask(i % 10, rng)
        image = v2.functional.to_image(Image.open(io.BytesIO(data)).convert("RGB"))
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        target = torch.from_numpy(mask).long() * (i % len(SHAPES) + 1)
        images.append(v2.functional.resize(image, [96, 96]))
        masks.append(v2.functional.resize(target[None], [96, 96], interpolation=v2.InterpolationMode.NEAREST)[0])
    x, y = torch.stack(images), torch.stack(masks)
    model = downstream.upernet(VARIANT, classes=len(SHAPES) + 1, export=str(export))
    optimizer = torch.optim.AdamW(downstream.backbone_param_groups(model, model.encoder.model, 0.05, 0.8, lr=1e-3))
    model.train()
    losses = []
    for step in range(16):
        batch = slice(4 * (step % 2), 4 * (step % 2) + 4)
        logits = model(x[batch])
        assert logits.shape == (4, len(SHAPES) + 1, 96, 96)
        loss = torch.nn.functional.cross_entropy(logits, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and _falls(losses), losses
