"""Tests for jalias.data: preprocessing parity with transformers SAM3, IoU, COCO masks, datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from jalias.data import (
    CONCEPT_NAMES,
    ConceptData,
    RLEMasks,
    check_mask,
    decode_annotation,
    decode_rle,
    encode_rle,
    iou,
    load_coco,
    load_image,
    make_dataset,
    preprocess,
    resize_image,
    resize_mask,
    split_concept,
    split_heldout,
    union_of_instances,
    write_coco,
)

# (H, W, S): downscale, upscale, same size, one axis only, thin images, odd sizes, real SAM3 size.
RESIZE_CASES = [
    (37, 53, 64),
    (200, 150, 64),
    (64, 64, 64),
    (64, 90, 64),
    (2, 300, 48),
    (300, 301, 288),
    (480, 640, 1008),
    (1500, 900, 1008),
]


def _random_image(rng, h, w):
    # Half noise, half smooth gradient: noise stresses rounding, gradients stress the weights.
    noise = rng.integers(0, 256, (h, w, 3))
    ramp = (np.linspace(0, 255, w)[None, :, None] + np.linspace(0, 120, h)[:, None, None]) % 256
    return np.where(rng.random((h, w, 1)) < 0.5, noise, ramp).astype(np.uint8)


def _torch_reference(img: np.ndarray, size: int) -> np.ndarray:
    """What Sam3ImageProcessor's TorchvisionBackend does on CPU, step by step: tvF.resize on the uint8
    tensor (-> F.interpolate bilinear, antialias=True, native uint8 kernel), then the fused
    rescale+normalize normalize(x.float(), mean/rescale, std/rescale)."""
    t = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    if img.shape[:2] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    std = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    return ((t.float() - mean[:, None, None]) / std[:, None, None]).numpy()


def _processor_case_images():
    rng = np.random.default_rng(7)
    images = [_random_image(rng, h, w) for h, w, _ in RESIZE_CASES]
    rng = np.random.default_rng(4)
    seg_image = _random_image(rng, 45, 61)
    return images, seg_image, rng.random((45, 61)) < 0.5


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory):
    """transformers' own Sam3ImageProcessor run on the test cases, in a subprocess (tests/torchvision_shim.py):
    with torchvision where it works, else with its two tensor kernels (uint8 antialiased bilinear resize, normalize)
    restated in torch (torchvision is not in the dev extra; the processor's own code runs either way, no skip).
    -> the script's outputs (pixel_values_<i>, labels, backend)."""
    import subprocess
    import sys
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("hf_processor")
    images, seg_image, seg_map = _processor_case_images()
    cases = {f"image_{i}": im for i, im in enumerate(images)}
    cases.update({f"size_{i}": np.asarray([s]) for i, (_, _, s) in enumerate(RESIZE_CASES)})
    np.savez(tmp / "in.npz", seg_image=seg_image, seg_map=seg_map.astype(np.uint8), seg_size=np.asarray([32, 32]),
             seg_mask_size=np.asarray([20, 24]), **cases)
    script = str(Path(__file__).with_name("torchvision_shim.py"))
    cmd = [sys.executable, script, str(tmp / "in.npz"), str(tmp / "out.npz")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:  # no (working) torchvision here
        run = subprocess.run(cmd + ["--shim", str(tmp / "shim")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    with np.load(tmp / "out.npz") as z:
        out = {k: z[k] for k in z.files}
    print(f"Sam3ImageProcessor ran with backend: {out['backend']}")
    return out


# ----------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("h,w,s", RESIZE_CASES)
def test_preprocess_matches_torch_sam3_pipeline_exactly(h, w, s):
    img = _random_image(np.random.default_rng(h * 1000 + w), h, w)
    ours = preprocess(img, s)
    ref = _torch_reference(img, s)
    assert ours.shape == (1, 3, s, s) and ours.dtype == np.float32
    # Same integer arithmetic as torch's uint8 kernel: measured max abs diff 0.0 on every case.
    np.testing.assert_array_equal(ours, ref)


def test_preprocess_matches_transformers_sam3_image_processor(hf_processor):
    images, _, _ = _processor_case_images()
    for i, (img, (_, _, s)) in enumerate(zip(images, RESIZE_CASES)):
        ref = hf_processor[f"pixel_values_{i}"]
        assert ref.shape == (1, 3, s, s) and ref.dtype == np.float32
        np.testing.assert_array_equal(preprocess(img, s), ref)


def test_resize_mask_matches_sam3_segmentation_map_path():
    # Sam3ImageProcessor resizes segmentation maps with PIL NEAREST -> torchvision NEAREST_EXACT.
    rng = np.random.default_rng(3)
    for (h, w), (oh, ow) in [((37, 53), (20, 30)), ((480, 640), (288, 288)), ((5, 7), (288, 100)), ((99, 99), (99, 99))]:
        m = rng.random((h, w)) < 0.4
        ref = F.interpolate(torch.from_numpy(m.astype(np.uint8))[None, None], size=(oh, ow), mode="nearest-exact")
        np.testing.assert_array_equal(resize_mask(m, (oh, ow)), ref[0, 0].numpy().astype(bool))
    stacked = rng.random((2, 3, 10, 12)) < 0.5
    assert resize_mask(stacked, 4).shape == (2, 3, 4, 4)


def test_resize_mask_matches_real_processor_labels(hf_processor):
    _, _, m = _processor_case_images()
    np.testing.assert_array_equal(resize_mask(m, (20, 24)), hf_processor["labels"][0].astype(bool))


def test_preprocess_batches_and_value_range():
    rng = np.random.default_rng(0)
    a, b = _random_image(rng, 30, 40), _random_image(rng, 50, 20)
    batch = preprocess([a, b], 32)
    assert batch.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(batch[1], preprocess(b, 32)[0])
    stacked = preprocess(np.stack([a, a]), 32)
    np.testing.assert_array_equal(stacked[0], stacked[1])
    white = preprocess(np.full((10, 10, 3), 255, np.uint8), 16)
    black = preprocess(np.zeros((10, 10, 3), np.uint8), 16)
    assert np.all(white == 1.0) and np.all(black == -1.0)
    # Same size: no resampling at all, pixel (0, 0) of channel 0 maps straight through.
    assert preprocess(a[:32, :32].copy(), 32)[0, 0, 0, 0] == np.float32((int(a[0, 0, 0]) - 127.5) / 127.5)


def test_resize_image_differs_from_plain_pil_by_at_most_2_levels():
    # Documented fact: PIL's BILINEAR (same filter, 22-bit fixed point) is close but not identical.
    img = _random_image(np.random.default_rng(1), 480, 640)
    ours = resize_image(img, 1008).astype(int)
    pil = np.asarray(Image.fromarray(img).resize((1008, 1008), Image.BILINEAR)).astype(int)
    assert np.abs(ours - pil).max() <= 2


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8), np.uint8), "uint8"),
        (np.zeros((8, 8, 4), np.uint8), "uint8"),
        ([], "empty"),
        ("img.png", "expects"),
    ],
)
def test_preprocess_rejects_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        preprocess(bad, 16)


def test_load_image_modes_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)

    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = load_image(str(tmp_path / "gray.png"))
    assert out.shape == (9, 11, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], gray)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(tmp_path / "broken.png")


# ------------------------------------------------------------------------------------------ masks


def test_iou_hand_made_values():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    left = np.zeros((4, 4), bool)
    left[:, :2] = True  # 8 px
    top = np.zeros((4, 4), bool)
    top[:1, :] = True  # 4 px, 2 overlap with left
    assert iou(empty, empty) == 1.0
    assert iou(empty, left) == 0.0 and iou(left, empty) == 0.0
    assert iou(full, full) == 1.0
    assert iou(left, full) == np.float32(0.5)
    assert iou(left, top) == np.float32(2 / 10)
    assert iou(left, ~left) == 0.0
    batch = iou(np.stack([empty, left, full]), left)  # gt broadcasts over the batch
    assert batch.dtype == np.float32 and batch.shape == (3,)
    np.testing.assert_array_equal(batch, np.array([0.0, 1.0, 0.5], np.float32))
    assert iou(np.stack([empty, empty]), np.stack([empty, left])).tolist() == [1.0, 0.0]


def test_iou_errors():
    with pytest.raises(ValueError, match="bool"):
        iou(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="sizes differ"):
        iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_union_of_instances():
    a = np.zeros((3, 3), bool)
    a[0, 0] = True
    b = np.zeros((3, 3), bool)
    b[2, 1] = True
    u = union_of_instances([a, b])
    assert u.sum() == 2 and u[0, 0] and u[2, 1]
    assert union_of_instances([], shape=(3, 5)).shape == (3, 5)
    assert not union_of_instances([], shape=(3, 5)).any()
    with pytest.raises(ValueError, match="no shape"):
        union_of_instances([])
    with pytest.raises(ValueError, match="shape"):
        union_of_instances([a, np.zeros((2, 3), bool)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools decode vs numpy 2, harmless
def test_polygon_and_rle_decoding_match_pycocotools():
    h, w = 20, 30
    polys = [[2.0, 2.0, 12.0, 3.0, 8.0, 15.0], [20.0, 5.0, 28.0, 5.0, 28.0, 18.0, 20.0, 18.0]]
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    got = decode_annotation({"segmentation": polys}, h, w)
    assert got.shape == (h, w) and got.dtype == bool and got.sum() > 50
    np.testing.assert_array_equal(got, ref)
    # A 4-number "polygon" has no area: it must not be misread as a box.
    np.testing.assert_array_equal(decode_annotation([[1, 1, 5, 5]] + polys, h, w), ref)

    compressed = encode_rle(ref)
    assert isinstance(compressed["counts"], str)
    np.testing.assert_array_equal(decode_annotation({"segmentation": compressed}, h, w), ref)
    uncompressed = encode_rle(ref, compressed=False)
    assert sum(uncompressed["counts"]) == h * w
    pyc = mask_utils.decode(mask_utils.frPyObjects(uncompressed, h, w)).astype(bool)
    np.testing.assert_array_equal(pyc, ref)
    np.testing.assert_array_equal(decode_annotation(uncompressed, h, w), ref)
    np.testing.assert_array_equal(decode_rle(uncompressed), ref)
    # Mask starting with a foreground pixel: counts start with a zero-length background run.
    corner = np.zeros((h, w), bool)
    corner[0, 0] = True
    assert encode_rle(corner, compressed=False)["counts"][:2] == [0, 1]
    np.testing.assert_array_equal(decode_rle(encode_rle(corner, compressed=False)), corner)

    with pytest.raises(ValueError, match="does not match"):
        decode_annotation(compressed, h + 1, w)
    with pytest.raises(ValueError, match="odd"):
        decode_annotation([[1.0, 2.0, 3.0, 4.0, 5.0]], h, w)


def test_check_mask():
    m = np.zeros((5, 6), bool)
    m[1, 2] = True
    assert check_mask(m, (5, 6)) is not None
    assert check_mask(m.astype(np.uint8), (5, 6)).dtype == bool
    assert not check_mask(np.zeros((5, 6), bool), (5, 6), negative=True).any()
    with pytest.raises(ValueError, match="empty"):
        check_mask(np.zeros((5, 6), bool), (5, 6), where="img_7")
    with pytest.raises(ValueError, match="declared negative"):
        check_mask(m, (5, 6), negative=True)
    with pytest.raises(ValueError, match=r"does not match image shape"):
        check_mask(m, (6, 5))
    with pytest.raises(ValueError, match="bool"):
        check_mask(m * 0.5, (5, 6))


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_seed_dependent():
    a = make_dataset(n_images_per_concept=3, image_size=48, seed=5)
    b = make_dataset(n_images_per_concept=3, image_size=48, seed=5)
    c = make_dataset(n_images_per_concept=3, image_size=48, seed=6)
    assert [s.image_id for s in a.samples] == [s.image_id for s in b.samples]
    for sa, sb in zip(a.samples, b.samples):
        assert sa.image.tobytes() == sb.image.tobytes()
        for name in sa.masks:
            assert sa.masks[name].tobytes() == sb.masks[name].tobytes()
    assert any(sa.image.tobytes() != sc.image.tobytes() for sa, sc in zip(a.samples, c.samples))
    # An image only depends on (seed, concept, index), not on the other concepts requested.
    single = make_dataset(n_images_per_concept=3, image_size=48, concepts=["dotted_ring"], seed=5)
    full_rings = [s for s in a.samples if s.image_id.startswith("dotted_ring")]
    assert [s.image.tobytes() for s in single.samples] == [s.image.tobytes() for s in full_rings]


def test_synthetic_content():
    ds = make_dataset(n_images_per_concept=4, image_size=64, seed=0)
    assert [c.name for c in ds.concepts] == CONCEPT_NAMES and len(CONCEPT_NAMES) >= 4
    assert ds.concepts[0].label == "striped blob"
    assert len(ds.samples) == 4 * len(CONCEPT_NAMES)
    for s in ds.samples:
        target = s.image_id.rsplit("_", 1)[0]
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert set(s.masks) == set(CONCEPT_NAMES)
        frac = s.masks[target].mean()
        assert 0.01 < frac < 0.7, (s.image_id, frac)
        for name, m in s.masks.items():
            assert m.shape == (64, 64) and m.dtype == bool
            inst = [i.mask for i in s.instances if i.concept == name]
            np.testing.assert_array_equal(m, union_of_instances(inst, shape=(64, 64)))
        # objects do not overlap, so visible pixels == instance pixels
        total = sum(i.mask.sum() for i in s.instances)
        assert total == union_of_instances([i.mask for i in s.instances], shape=(64, 64)).sum()
    # distractors of other concepts appear somewhere
    assert any(len({i.concept for i in s.instances}) > 1 for s in ds.samples)
    # the object pixels carry a texture (two colours), not a flat fill
    s = ds.samples[0]
    assert len(np.unique(s.image[s.masks["striped_blob"]].reshape(-1, 3), axis=0)) >= 2
    with pytest.raises(ValueError, match="unknown synthetic concept"):
        make_dataset(concepts=["purple_cow"])


def test_synthetic_concept_data():
    ds = make_dataset(n_images_per_concept=2, image_size=48, concepts=["checkered_star", "dotted_ring"], seed=1)
    cds = ds.concept_data()
    assert [c.name for c in cds] == ["checkered_star", "dotted_ring"]
    for cd in cds:
        assert len(cd.images) == len(cd.masks) == len(cd.image_ids) >= 2
        assert all(m.any() for m in cd.masks)
        assert len(cd.negatives) == len(cd.negative_ids) == len(ds.samples) - len(cd.images)
        assert cd.image(0).shape == (48, 48, 3)


# ------------------------------------------------------------------------------------------- coco


def test_write_coco_load_coco_round_trip(tmp_path):
    ds = make_dataset(n_images_per_concept=3, image_size=48, seed=2)
    ann_path, images_dir = write_coco(ds, tmp_path / "coco")
    with open(ann_path) as f:
        coco = json.load(f)
    segs = [a["segmentation"] for a in coco["annotations"]]
    assert any(isinstance(s, list) for s in segs), "some polygons"
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs), "some compressed RLE"
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs), "some uncompressed RLE"
    assert sum(a["iscrowd"] for a in coco["annotations"]) == 1

    loaded = load_coco(ann_path, images_dir)
    by_id = {f"{s.image_id}.png": s for s in ds.samples}
    assert [c.name for c in loaded] == [c.name for c in ds.concepts]
    for cd, concept in zip(loaded, ds.concepts):
        assert cd.label == concept.label
        assert isinstance(cd.masks, RLEMasks) and all(isinstance(p, str) for p in cd.images)  # lazy
        expected_pos = [f"{s.image_id}.png" for s in ds.samples if s.masks[concept.name].any()]
        assert sorted(cd.image_ids) == sorted(expected_pos)
        assert sorted(cd.negative_ids) == sorted(set(by_id) - set(expected_pos))
        for i, image_id in enumerate(cd.image_ids):
            np.testing.assert_array_equal(cd.masks[i], by_id[image_id].masks[concept.name])
            np.testing.assert_array_equal(cd.image(i), by_id[image_id].image)

    capped = load_coco(ann_path, images_dir, categories=["dotted_ring", "striped_blob"], max_images=2)
    assert [c.name for c in capped] == ["dotted_ring", "striped_blob"]
    assert all(len(c.images) == 2 and len(c.negatives) == 2 for c in capped)


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_load_coco_errors(tmp_path):
    ds = make_dataset(n_images_per_concept=1, image_size=32, concepts=["striped_blob", "gridded_hexagon"], seed=0)
    ann_path, images_dir = write_coco(ds, tmp_path)
    coco = json.loads(open(ann_path).read())

    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json", images_dir)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(bad, images_dir)
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load_coco(_write_json(tmp_path / "noann.json", {"images": [], "categories": []}), images_dir)
    with pytest.raises(ValueError, match=r"unknown category 'zebra'.*striped_blob"):
        load_coco(ann_path, images_dir, categories=["zebra"])

    no_masks = dict(coco, categories=coco["categories"] + [{"id": 99, "name": "ghost"}])
    path = _write_json(tmp_path / "ghost.json", no_masks)
    with pytest.raises(ValueError, match="category 'ghost' has no segmentation masks"):
        load_coco(path, images_dir, categories=["ghost"])
    assert [c.name for c in load_coco(path, images_dir)] == ["striped_blob", "gridded_hexagon"]  # skipped

    os.remove(os.path.join(images_dir, "gridded_hexagon_000.png"))  # found when decoded, not when listed
    (hexagon,) = load_coco(ann_path, images_dir, categories=["gridded_hexagon"])
    with pytest.raises(FileNotFoundError, match="gridded_hexagon_000.png"):
        hexagon.image(hexagon.image_ids.index("gridded_hexagon_000.png"))

    ann2, images2 = write_coco(ds, tmp_path / "again")
    with open(os.path.join(images2, "striped_blob_000.png"), "wb") as f:
        f.write(b"garbage")
    cd = load_coco(ann2, images2, categories=["striped_blob"])[0]
    with pytest.raises(ValueError, match="striped_blob_000.png"):
        cd.image(cd.image_ids.index("striped_blob_000.png"))


def test_load_coco_box_only_annotations_are_not_negatives(tmp_path):
    ds = make_dataset(n_images_per_concept=2, image_size=32, concepts=["striped_blob", "gridded_hexagon"], seed=3)
    ann_path, images_dir = write_coco(ds, tmp_path)
    coco = json.loads(open(ann_path).read())
    before = load_coco(ann_path, images_dir, categories=["striped_blob"])[0]
    victim = before.negative_ids[0]
    image_id = next(im["id"] for im in coco["images"] if im["file_name"] == victim)
    coco["annotations"].append({"id": 999, "image_id": image_id, "category_id": 1, "bbox": [0, 0, 4, 4],
                                "iscrowd": 0, "area": 16.0})  # box only, no segmentation
    path = _write_json(tmp_path / "boxes.json", coco)
    after = load_coco(path, images_dir, categories=["striped_blob"])[0]
    assert victim not in after.negative_ids and victim not in after.image_ids
    assert after.image_ids == before.image_ids


def test_split_heldout():
    items = list(range(10))
    s1, h1 = split_heldout(items, 0.3, seed=0)
    s2, h2 = split_heldout(items, 0.3, seed=0)
    assert (s1, h1) == (s2, h2)
    assert len(h1) == 3 and sorted(s1 + h1) == items and s1 == sorted(s1)
    assert split_heldout(items, 0.3, seed=1) != (s1, h1)
    assert [len(p) for p in split_heldout([1, 2], 0.01)] == [1, 1]
    assert [len(p) for p in split_heldout([1, 2, 3], 0.99)] == [1, 2]
    assert split_heldout(["a"], 0.5) == (["a"], [])
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(items, 1.0)

    masks = [np.eye(3, dtype=bool)] * 4
    cd = ConceptData("c", "c", [np.zeros((3, 3, 3), np.uint8)] * 4, masks, ["a", "b", "c", "d"],
                     [np.zeros((3, 3, 3), np.uint8)] * 2, ["n1", "n2"])
    search, held = split_concept(cd, 0.25, seed=0)
    assert sorted(search.image_ids + held.image_ids) == ["a", "b", "c", "d"]
    assert len(held.image_ids) == 1 and len(held.masks) == 1
    assert sorted(search.negative_ids + held.negative_ids) == ["n1", "n2"]
