"""Synthetic captions with BLIP-2, as CommonCanvas captioned its Creative-Commons images.

    python -m trainer.caption --data DIR --model PATH [--batch-size 16] [--max-new-tokens 40]

PATH is a local transformers BLIP-2 folder (Blip2ForConditionalGeneration weights and a
Blip2Processor, e.g. a copy of Salesforce/blip2-opt-2.7b); nothing is downloaded. Every readable
image of the image folder DIR (trainer.data's index; unreadable files are skipped and listed in
DIR/caption_skipped_files.txt)
gets `synthetic_text` and `synthetic_model` (the model folder's name) in the metadata.jsonl row
that describes it; an image without a row gets one in DIR/metadata.jsonl holding only its
file_name and those two, so its caption stays in its .txt file (trainer.data reads a row
without `text` so), where later edits still count. Original captions are never changed.
Rows are saved every --save-every batches and when the run stops (each file rewritten
atomically), and images already captioned by the same model are skipped, so an interrupted
run resumes.
Train on the new captions with `data.caption_field=synthetic_text`.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.data import build_index
from trainer.data.index import folder_files, metadata_key
from trainer.data.pil import decode_rgb

log = logging.getLogger("trainer.caption")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_captioner(path, device="cpu", dtype=torch.float32):
    """(Blip2ForConditionalGeneration, Blip2Processor) from the local folder `path`."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    if not Path(path).is_dir():
        raise ValueError(f"BLIP-2 model path {str(path)!r} is not a directory")
    processor = Blip2Processor.from_pretrained(path, local_files_only=True)
    model = Blip2ForConditionalGeneration.from_pretrained(path, local_files_only=True)
    return model.eval().requires_grad_(False).to(device, dtype), processor


@torch.no_grad()
def generate_captions(model, processor, images, max_new_tokens=40):
    """Captions (list of str) of a list of PIL images."""
    inputs = processor(images=images, return_tensors="pt")
    pixels = inputs["pixel_values"].to(model.device, model.dtype)
    ids = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    # The output repeats the prompt (query placeholders, BOS): all special tokens, dropped here.
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


class Metadata:
    """The metadata.jsonl rows of an image folder, with which file (and line) holds each image's
    row as trainer.data reads them (the last of several wins)."""

    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        self.files = {}  # jsonl path -> list of rows
        self.where = {}  # image name relative to root -> (jsonl path, row number)
        for jsonl in folder_files(self.root)[1]:
            rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8-sig").splitlines()
                    if line.strip()]
            self.files[jsonl] = rows
            for i, row in enumerate(rows):
                self.where[metadata_key(jsonl, self.root, row["file_name"])] = (jsonl, i)
        self.dirty = set()

    def get(self, name):
        """The row of image `name`, or {} when it has none."""
        jsonl, i = self.where.get(name, (None, None))
        return {} if jsonl is None else self.files[jsonl][i]

    def set(self, sample, **fields):
        """Updates the row of `sample` (an index Sample), created if missing: without `text`,
        which would freeze a copy of the .txt caption (an image without a row has no license
        or source either)."""
        if sample.name not in self.where:
            jsonl = self.root / "metadata.jsonl"
            rows = self.files.setdefault(jsonl, [])
            rows.append({"file_name": sample.name})
            self.where[sample.name] = (jsonl, len(rows) - 1)
        jsonl, i = self.where[sample.name]
        self.files[jsonl][i].update(fields)
        self.dirty.add(jsonl)

    def save(self):
        for jsonl in sorted(self.dirty):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.files[jsonl])
            tmp = jsonl.with_name(f".{jsonl.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, jsonl)
        self.dirty.clear()


def caption_folder(data, model_path, *, batch_size=16, max_new_tokens=40, save_every=8,
                   device="cpu", precision="auto", cache_dir=None):
    """Adds BLIP-2 captions to the image folder `data`; returns how many images it captioned."""
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("save_every", save_every)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name}={value!r}; expected an integer >= 1")
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}; expected auto or one of {list(DTYPES)}")
    index = build_index(data, "folder", cache_dir=cache_dir)
    index.report(index.root, "caption_skipped_files.txt")  # next to the metadata.jsonl it writes
    model_name = Path(model_path).resolve().name
    meta = Metadata(index.root)
    todo = [s for s in index.samples if meta.get(s.name).get("synthetic_model") != model_name]
    log.info("caption: %d of %d images to caption with %s", len(todo), len(index), model_name)
    if not todo:
        return 0
    model, processor = load_captioner(model_path, device, DTYPES[precision])
    try:
        for k, start in enumerate(tqdm(range(0, len(todo), batch_size), desc="caption", unit="batch")):
            batch = todo[start:start + batch_size]
            texts = generate_captions(model, processor, [decode_rgb(s.read()) for s in batch],
                                      max_new_tokens)
            for sample, text in zip(batch, texts):
                meta.set(sample, synthetic_text=text, synthetic_model=model_name)
            if (k + 1) % save_every == 0:
                meta.save()
    finally:  # Ctrl-C or an error keeps the captions made so far (a rerun goes on from them)
        meta.save()
    return len(todo)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder (captions go to its metadata.jsonl)")
    p.add_argument("--model", required=True, help="local BLIP-2 folder (model + processor)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--save-every", type=int, default=8, help="batches between saves")
    p.add_argument("--precision", default="auto", choices=["auto", *DTYPES],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--cache-dir", help="trainer.data's validation cache")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = caption_folder(args.data, args.model, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, save_every=args.save_every,
                       device=device, precision=args.precision, cache_dir=args.cache_dir)
    log.info("caption: captioned %d images in %s", n, args.data)


if __name__ == "__main__":
    main()
