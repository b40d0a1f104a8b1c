"""Images, masks and datasets: the one preprocessing path, the one IoU, COCO and synthetic data."""

from .coco import ConceptData, RLEMasks, load_coco, split_concept, split_heldout
from ..model.preprocess import DEFAULT_IMAGE_SIZE, load_image, preprocess, resize_image, resize_mask
from .masks import check_mask, decode_annotation, decode_rle, encode_rle, iou, union_of_instances
from .synthetic import CONCEPT_NAMES, Concept, Dataset, Sample, make_dataset, write_coco

__all__ = [
    "CONCEPT_NAMES",
    "Concept",
    "ConceptData",
    "DEFAULT_IMAGE_SIZE",
    "Dataset",
    "RLEMasks",
    "Sample",
    "check_mask",
    "decode_annotation",
    "decode_rle",
    "encode_rle",
    "iou",
    "load_coco",
    "load_image",
    "make_dataset",
    "preprocess",
    "resize_image",
    "resize_mask",
    "split_concept",
    "split_heldout",
    "union_of_instances",
    "write_coco",
]
