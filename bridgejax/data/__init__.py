"""Datasets for bridgejax: prepared once into array_record shards, read with grain.

    python -m bridgejax.prepare {cc3m,coco,vqav2,visdial,jsonl,toy} --src ... --out DIR

    from bridgejax import data
    loader = data.train_dataset(DIR, "train", tokenizer, batch_size=180, seed=0, worker_count=4)
    evals = data.eval_dataset(DIR, "val", batch_size=100, tokenizer=tokenizer)
    records = data.open_split(DIR, "vqa_val")       # random access to the records' text and ids

Modules: image (CLIP transform, safe decoding), records (on-disk format and schemas), sources/
(one per input format), prepare/ (the writers and their CLI; `toy` is bridgejax.toy's), splits
(which split each eval task reads), pipeline (grain loaders).
"""

from bridgejax.data.image import ImageError, clip_preprocess, decode_image
from bridgejax.data.pipeline import (Loader, eval_dataset, restore_iterator_state,
                                     save_iterator_state, train_dataset)
from bridgejax.data.records import DatasetWriter, RecordError, Split, load_info, open_split

__all__ = ["ImageError", "clip_preprocess", "decode_image", "Loader", "eval_dataset",
           "restore_iterator_state", "save_iterator_state", "train_dataset", "DatasetWriter",
           "RecordError", "Split", "load_info", "open_split"]
