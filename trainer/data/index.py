"""The dataset index: every usable sample of an image folder or of WebDataset shards.

Built once before training by a pass that fully decodes every image (with PIL, then with
DALI's decoder where DALI is installed), so that a bad file (empty, truncated, not an image,
unsupported format or mode, or one DALI cannot read) is skipped here, listed with its
reason, and never reaches a loader mid-epoch. Validation results are cached per file,
keyed by size and modification time, so a second run only re-checks what changed.

Folder: images (.jpg .jpeg .png .webp, any depth, symbolic links followed; other image types,
unreadable folders and links to nothing are listed as skipped); caption from a metadata.jsonl row
(Hugging Face imagefolder: file_name relative to the jsonl's folder, text, and optional
license, source; a row without text leaves the .txt caption), else from a same-name .txt next
to the image (UTF-8; one that is not is read with U+FFFD for its bad bytes, counted and
reported), else "" (counted).
caption_field="synthetic_text" takes that field of the rows instead (trainer.caption writes
it), and of a WebDataset sample's .json; .txt captions are then not used.
WebDataset: uncompressed .tar shards (one that cannot be read, or holds no sample, is
skipped and listed like a bad image; one damaged part-way, as a download cut short, gives the
samples before the damage and is listed too); a sample is the members sharing a key (the name up
to the first dot of its basename); image from its jpg/jpeg/png/webp member, caption from
.txt, else from .json ("caption" or "text", plus optional license, source; a sample whose caption
.json is no JSON object is skipped and listed; captions that are not UTF-8 as in folders). Each shard needs the index
file DALI's webdataset reader reads (a.tar: a.idx, in DALI's "v1.2" text format, as DALI's
wds2idx writes it); it is written next to the shard when missing or older than the shard
(into the cache folder when the shard's folder is read-only).
"""

import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from trainer.data.config import cache_root

log = logging.getLogger("trainer.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Image files the folder scan lists as skipped rather than passing over in silence.
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "jxl", "jp2")
# MPO: a JPEG followed by more images (camera and phone photos carry a large preview so); PIL
# names it MPO and counts the extra images as frames, both decoders read the first JPEG.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
# Modes both decoders turn into 8-bit RGB: alpha is dropped (DALI's RGB output does that,
# so PIL does the same), palettes expanded, CMYK/YCbCr converted, 16-bit scaled down.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
               "I;16", "I;16B", "I;16L", "I")
# A longer side over this many times the shorter one: the square crop would hold a sliver of
# the image its caption describes, and resizing the shorter side to the resolution before
# cropping would take memory in proportion (a 60000x1 strip: gigabytes).
MAX_ASPECT_RATIO = 16
CACHE_VERSION = 2  # 2: MAX_ASPECT_RATIO checked
DALI_INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Sample:
    path: str          # the image file, or the .tar shard holding it
    offset: int        # byte offset of the image inside the shard; -1 for a plain file
    size: int          # bytes of the encoded image
    name: str          # path relative to the dataset root, or the member name in the shard
    caption: str
    license: str = ""
    source: str = ""

    def read(self):
        """The encoded image bytes."""
        return read_bytes(self.path, self.offset, self.size)


@dataclass
class DatasetIndex:
    format: str
    root: str
    samples: list          # usable samples, in a fixed order
    skipped: list          # (name, reason) of every unusable image file or shard
    missing_captions: int

    def __len__(self):
        return len(self.samples)

    def shard_groups(self):
        """Sample ids grouped by the file they live in (one group per .tar shard)."""
        groups = {}
        for i, s in enumerate(self.samples):
            groups.setdefault(s.path, []).append(i)
        return list(groups.values())

    def report(self, out_dir=None, filename="skipped_files.txt"):
        """Logs the counts and writes <out_dir>/<filename> (name <TAB> reason of each skipped file)."""
        where = list_skipped(out_dir, filename, self.skipped)
        log.info("data: %d images in %s, %d unreadable skipped%s, %d without caption",
                 len(self.samples), self.root, len(self.skipped), where, self.missing_captions)
        for name, reason in self.skipped[:5]:
            log.warning("data: skipped %s: %s", name, reason)


def list_skipped(out_dir, filename, skipped):
    """Writes the (name, reason) pairs to <out_dir>/<filename>, one 'name <TAB> reason' line
    each (tabs and line breaks in them as \\t, \\n, \\r), when there are any and out_dir is
    given; removes an earlier run's list when there are none. Returns ' (listed in PATH)' or ''."""
    if out_dir is None:
        return ""
    path = os.path.join(out_dir, filename)
    if not skipped:
        if os.path.exists(path):
            os.remove(path)  # the files it listed were fixed or removed
        return ""
    os.makedirs(out_dir, exist_ok=True)
    one_line = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})  # as backslash escapes
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{name.translate(one_line)}\t{reason.translate(one_line)}\n" for name, reason in skipped)
    return f" (listed in {path})"


def read_bytes(path, offset, size):
    """A whole file (offset -1), or `size` bytes at `offset` of a shard."""
    with open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        return f.read(size)


# The reasons of files that cannot be read (permissions, I/O) start so: _ValidationCache does not
# keep them, since they say nothing of the file's bytes.
UNREADABLE = "unreadable ("


def _unreadable(e):
    return f"{UNREADABLE}{type(e).__name__}: {e.strerror or e})"


def check_candidate(cand):
    """check_image of a candidate's bytes, or why they cannot be read."""
    try:
        data = cand.read()
    except OSError as e:
        return _unreadable(e)
    return check_image(data)


def check_image(data):
    """None if `data` decodes to an image both backends handle, else the reason it does not."""
    if not data:
        return "empty file"
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except Exception as e:  # PIL raises several types for garbage; all mean the same here
        return f"not an image ({type(e).__name__})"
    if max(im.size) > MAX_ASPECT_RATIO * min(im.size):
        return f"aspect ratio over {MAX_ASPECT_RATIO}:1 ({im.size[0]}x{im.size[1]})"
    if im.format not in IMAGE_FORMATS:
        return f"unsupported format {im.format}"
    if im.mode not in IMAGE_MODES:
        return f"unsupported mode {im.mode}"
    if im.format != "MPO" and getattr(im, "n_frames", 1) > 1:
        return "animated image"
    # A truncated file parses its header fine; only a full decode finds the missing data.
    try:
        im.load()
    except Exception as e:
        return f"truncated or corrupt ({type(e).__name__}: {e})"
    return None


def existing_data_path(path):
    """`path` resolved; ValueError naming it as data.path where it does not exist."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise ValueError(f"data.path {str(path)!r} does not exist")
    return root


def build_index(path, format="folder", *, cache_dir=None, workers=None, caption_field="text"):
    """Scans and validates the dataset at `path`; raises ValueError when no image is usable."""
    root = existing_data_path(path)
    if format == "folder":
        if not root.is_dir():
            raise ValueError(f"data.path {str(path)!r} is not a folder (data.format=folder)")
        candidates, captions, skipped = _scan_folder(root, caption_field)
    elif format == "webdataset":
        candidates, captions, skipped = _scan_webdataset(root, caption_field, cache_dir)
    else:
        raise ValueError(f"build_index reads format 'folder' or 'webdataset', got {format!r}")

    threads = workers or min(8, os.cpu_count() or 1)
    cache = _ValidationCache(root, format, cache_dir)

    def pil_check(cands):
        # PIL releases the GIL while decoding, so threads use all cores; results in order, as they come.
        with ThreadPoolExecutor(threads) as pool:
            yield from pool.map(check_candidate, cands)

    reasons = cache.check(candidates, "pil", pil_check)
    dali = _dali_check(threads)
    if dali is not None:
        # DALI's own decoder too, where installed: it rejects a few files PIL reads, and one of
        # those would stop a DALI run mid-epoch. Both backends then see the same samples.
        for i, cand in enumerate(candidates):
            if reasons[i] is None and _escaped(cand.path) != cand.path:  # surrogate escapes in it
                reasons[i] = "file name is not UTF-8 (DALI's reader cannot open it)"
        ok = [i for i, r in enumerate(reasons) if r is None]
        for i, r in zip(ok, cache.check([candidates[i] for i in ok], *dali)):
            reasons[i] = r
    cache.save()
    samples, missing = [], 0
    for cand, reason in zip(candidates, reasons):
        if reason is not None:
            skipped.append((cand.name, reason))
            continue
        meta = captions.get(cand.name)
        if meta is None or not meta.get("text"):
            missing += 1
        meta = meta or {}
        samples.append(Sample(cand.path, cand.offset, cand.size, cand.name,
                              meta.get("text", "") or "", str(meta.get("license", "") or ""),
                              str(meta.get("source", "") or "")))
    if not samples:
        if skipped:
            found = f"{len(skipped)} image file(s) or shard(s) found, all unusable: {skipped[:3]}"
        elif format == "folder":
            found = f"no .{', .'.join(IMAGE_EXTS)} file there" + (
                " (it holds precomputed latents: data.format=latents)" if (root / "index.json").is_file() else "")
        else:
            found = "no .tar shard there"
        raise ValueError(f"no readable image in {str(root)!r} (format={format}): {found}")
    if missing == len(samples):
        log.warning("data: none of the %d images in %s has a caption (data.caption_field=%s): training "
                    "unconditionally", len(samples), root, caption_field)
    return DatasetIndex(format, str(root), samples, skipped, missing)


def _dali_check(threads):
    """(name, check) of DALI's decode check (trainer.data.dali.undecodable) on `threads`
    threads, or None without DALI. The name holds DALI's version, so a DALI that reads more
    files checks them again."""
    try:
        import nvidia.dali  # as trainer.data.loader tests it
        from trainer.data.dali import undecodable
    except ImportError:
        return None
    return f"dali {nvidia.dali.__version__}", lambda cands: undecodable(cands, threads)


# ---- folders ----------------------------------------------------------------------------


def folder_files(root):
    """(image files, metadata.jsonl files, skipped) under the folder `root`, in name order.
    Hidden files and folders are left out, symbolic links followed; a file reached by several
    paths is taken once, by its own path if that is one of them. Listed as skipped, so that no
    image goes missing unsaid: folders that cannot be read, links to nothing, and images of
    types the loaders do not read."""
    found, skipped, seen = {}, [], set()  # found: real path -> the paths it was found by

    def unreadable_folder(e):
        skipped.append((_escaped(Path(e.filename).relative_to(root).as_posix()) + "/", f"folder {_unreadable(e)}"))

    for folder, subfolders, names in os.walk(root, onerror=unreadable_folder, followlinks=True):
        seen.add(os.path.realpath(folder))
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in seen]
        for name in names:
            p = Path(folder, name)
            ext = p.suffix[1:].lower()
            if name.startswith(".") or (ext not in IMAGE_EXTS + OTHER_IMAGE_EXTS and name != "metadata.jsonl"):
                continue
            shown = _escaped(p.relative_to(root).as_posix())
            if ext in OTHER_IMAGE_EXTS:
                skipped.append((shown, f"unsupported image type .{ext} (the loaders read .{', .'.join(IMAGE_EXTS)})"))
            elif not p.exists():
                skipped.append((shown, "symbolic link to nothing"))
            elif p.is_file():
                found.setdefault(os.path.realpath(p), []).append(p)
    own = sorted((min(paths, key=lambda p: (str(p) != target, p.parts)) for target, paths in found.items()),
                 key=lambda p: p.parts)
    return ([p for p in own if p.name != "metadata.jsonl"], [p for p in own if p.name == "metadata.jsonl"],
            skipped)


def metadata_key(jsonl, root, file_name):
    """The image a metadata.jsonl row names, as a path relative to `root` ("./a.jpg" is a.jpg)."""
    prefix = jsonl.parent.relative_to(root).as_posix()
    return posixpath.normpath(file_name if prefix == "." else f"{prefix}/{file_name}")


def _scan_folder(root, caption_field):
    """(candidates, captions by name, skipped): an image whose .txt caption cannot be read is
    skipped and listed (trained without it, it would teach the wrong conditioning)."""
    files, jsonls, skipped = folder_files(root)
    candidates, captions, not_utf8 = [], {}, []
    for p in files:
        cand = _Candidate(str(p), -1, p.stat().st_size, _escaped(p.relative_to(root).as_posix()))
        txt = p.with_suffix(".txt")
        if caption_field == "text" and txt.is_file():
            try:
                raw = txt.read_bytes()
            except OSError as e:
                skipped.append((cand.name, f"caption {txt.name} {_unreadable(e)}"))
                continue
            captions[cand.name] = {"text": _caption_text(raw, _escaped(txt.relative_to(root).as_posix()), not_utf8)}
        candidates.append(cand)
    _warn_not_utf8(not_utf8)
    names, unmatched = {c.name for c in candidates}, []
    for jsonl in jsonls:
        try:
            text = jsonl.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is no row
        except UnicodeDecodeError as e:
            raise ValueError(f"{jsonl} is not UTF-8 ({e})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                if not isinstance(name, str):
                    raise TypeError(f"file_name is {type(name).__name__}, not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{jsonl}:{lineno}: expected a JSON object with 'file_name' "
                                 f"({type(e).__name__}: {e})") from None
            key = metadata_key(jsonl, root, name)
            if key not in names:
                unmatched.append(f"{jsonl.name}:{lineno} {name}")
            entry = captions.setdefault(key, {})
            if caption_field in row:  # a row without it leaves the .txt caption
                entry["text"] = str(row[caption_field] or "").strip()
            entry.update(license=row.get("license", ""), source=row.get("source", ""))
    if unmatched:
        log.warning("data: %d metadata.jsonl row(s) name no image found in %s (a missing file, or one "
                    "skipped above), e.g. %s", len(unmatched), root, "; ".join(unmatched[:3]))
    return candidates, captions, skipped


# ---- WebDataset shards --------------------------------------------------------------------


def _scan_webdataset(root, caption_field, cache_dir):
    shards = sorted(root.glob("*.tar")) if root.is_dir() else [root]
    if not shards or any(s.suffix != ".tar" for s in shards):
        raise ValueError(f"data.path {str(root)!r}: expected a .tar shard or a folder of them")
    candidates, captions, skipped, not_utf8 = [], {}, [], []
    for shard in shards:
        # A damaged shard (cut short by a download, not a tar, empty) is skipped and listed
        # like an unreadable image, so that one bad shard does not stop a run.
        try:
            entries, damage = _shard_entries(shard, cache_dir)
        except (tarfile.TarError, ValueError) as e:
            skipped.append((_escaped(shard.name), f"unreadable WebDataset shard ({type(e).__name__}: {e})"))
            continue
        if damage is not None:
            kept = f"the {len(entries)} samples before the damage are" if len(entries) > 1 else "the sample before the damage is"
            skipped.append((_escaped(shard.name), f"damaged WebDataset shard ({damage}): {kept} used, any after it lost"))
        with open(shard, "rb") as f:
            for components in entries:
                by_ext = {ext.lower(): (off, size, name) for ext, off, size, name in components}
                image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
                if image is None:  # e.g. img.001.jpg: key img, extension 001.jpg (the WebDataset rule)
                    names = ", ".join(name for _, _, _, name in components)
                    skipped.append((f"{_escaped(shard.name)}/{names}", f"no {'/'.join(IMAGE_EXTS)} member in the sample"))
                    continue
                name = f"{_escaped(shard.name)}/{image[2]}"
                try:
                    captions[name] = _wds_caption(f, by_ext, caption_field, f"{_escaped(shard.name)}/", not_utf8)
                except ValueError as e:  # trained without its caption, it would teach the wrong conditioning
                    skipped.append((name, str(e)))
                    continue
                candidates.append(_Candidate(str(shard), image[0], image[1], name))
    _warn_not_utf8(not_utf8)
    return candidates, captions, skipped


def _shard_entries(shard, cache_dir):
    """(the samples of a shard as its DALI index lists them, None or where the shard is damaged).
    A damaged shard gets no index file: it is read again, and reported, every run."""
    _, samples = _indexed_samples(shard, cache_dir)
    if samples is not None:
        return samples, None
    samples, damage = _tar_samples(shard)
    if damage is None:
        _write_shard_index(shard, cache_dir, samples)
    return samples, damage


def _wds_caption(f, by_ext, caption_field, shard_prefix, not_utf8):
    """A sample's caption fields from its .txt and .json members (None without either); a
    .json the caption comes from that is not a JSON object is a ValueError naming it."""

    def member(ext):
        off, size, name = by_ext[ext]
        f.seek(off)
        return f.read(size), shard_prefix + _escaped(name)

    meta = {}
    text_from_txt = caption_field == "text" and "txt" in by_ext
    if "json" in by_ext:
        raw, name = member("json")
        try:
            row = json.loads(_caption_text(raw, name, not_utf8))
            why = None if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        except json.JSONDecodeError as e:
            why = f"not JSON: {e}"
        if why:
            if not text_from_txt:
                raise ValueError(f"its caption member {name} is no JSON object ({why})")
            row = {}  # the caption is the .txt's; only the licence and source are lost
        text = row.get("caption", row.get("text")) if caption_field == "text" else row.get(caption_field)
        meta = {"text": str(text or "").strip(), "license": row.get("license", ""), "source": row.get("source", "")}
    if text_from_txt:
        meta["text"] = _caption_text(*member("txt"), not_utf8)
    return meta or None


def _caption_text(raw, name, not_utf8):
    """Caption bytes as stripped text, a byte order mark dropped; bytes that are not UTF-8 are
    read as U+FFFD and the file's name goes to not_utf8."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        not_utf8.append(name)
        text = raw.decode("utf-8-sig", errors="replace")
    return text.strip()


def _warn_not_utf8(not_utf8):
    if not_utf8:
        log.warning("data: %d captions are not UTF-8 and were read with U+FFFD in place of their bad "
                    "bytes, e.g. %s; save them as UTF-8", len(not_utf8), not_utf8[0])


def dali_index_path(shard):
    """Where DALI's index of a shard lives: next to it, .tar replaced by .idx (as DALI's
    examples name wds2idx's output). Only the last suffix goes: shards part.0.tar and
    part.1.tar need two index files."""
    return Path(shard).with_suffix(".idx")


def ensure_dali_index(shard, cache_dir=None):
    """Writes the DALI index of `shard` when missing or older than the shard; returns its path.
    It goes next to the shard or, where that folder is read-only (datasets often are), under
    `cache_dir` (default $CCKERNELS_CACHE or ~/.cache/cckernels). ValueError for a damaged shard."""
    idx, _ = _indexed_samples(shard, cache_dir)
    if idx is not None:
        return idx
    samples, damage = _tar_samples(shard)
    if damage is not None:
        raise ValueError(f"WebDataset shard {str(shard)!r} is damaged: {damage}")
    return _write_shard_index(shard, cache_dir, samples)


def _index_places(shard, cache_dir):
    digest = hashlib.sha1(str(Path(shard).resolve()).encode()).hexdigest()[:16]
    return [dali_index_path(shard), cache_root(cache_dir) / "wds-index" / f"{digest}.idx"]


def _indexed_samples(shard, cache_dir):
    """(index file, its samples) of an up-to-date index of the shard, or (None, None). One in
    an older version, or that does not parse (written before member names were escaped, from
    a name with white space), is not used: it is written anew."""
    for idx in _index_places(shard, cache_dir):
        if idx.exists() and idx.stat().st_mtime_ns >= Path(shard).stat().st_mtime_ns:
            try:
                return idx, read_dali_index(idx)
            except ValueError:
                continue
    return None, None


def _tar_samples(shard):
    """(samples, damage) of a tar read header by header: per sample (consecutive members with
    the same key) its (ext, offset, size, name) groups, names escaped for the index; damage is
    None, or why the members after some point are lost: the samples before that point are
    kept (a download cut short keeps what it got). ValueError when none is left."""
    samples, damage = [], None
    size = os.path.getsize(shard)
    # "r:" reads uncompressed tars only: a compressed one would give offsets into the
    # decompressed stream, which neither DALI nor read_bytes can use.
    with tarfile.open(shard, "r:") as tar:
        members = []
        try:
            members.extend(tar)
        except tarfile.ReadError as e:  # the file ends inside a member, or a long-name header is bad
            damage = f"cut short at byte {size}, inside a member" if tar.offset > size else f"{e} at byte {tar.offset}"
        else:
            # tarfile stops quietly at a header it cannot parse or that the file cuts: only
            # zeros (the end-of-archive blocks) may follow the last member.
            tar.fileobj.seek(tar.offset)
            while damage is None and (block := tar.fileobj.read(1 << 16)):
                if block.strip(b"\0"):
                    damage = f"no valid tar header at byte {tar.offset}"
    for m in members:
        base = m.name.rsplit("/", 1)[-1]
        if not m.isreg() or base.startswith(".") or "." not in base:
            continue
        dot = len(m.name) - len(base) + base.index(".")
        key, ext = m.name[:dot], m.name[dot + 1:]
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((_index_safe(ext), m.offset_data, m.size, _index_safe(m.name)))
    if damage is not None:
        samples = samples[:-1]  # the sample being read at the damage may have lost members
    if not samples:
        raise ValueError(f"WebDataset shard {str(shard)!r} holds no sample" + (f" ({damage})" if damage else ""))
    return [components for _, components in samples], damage


def _write_shard_index(shard, cache_dir, samples):
    idx, spare = _index_places(shard, cache_dir)
    try:
        write_dali_index(idx, samples)
    except OSError:  # the shard's folder is read-only
        idx = spare
        idx.parent.mkdir(parents=True, exist_ok=True)
        write_dali_index(idx, samples)
    log.info("data: wrote DALI index %s (%d samples)", idx, len(samples))
    return idx


def _escaped(name):
    """A file name's bytes that are not UTF-8 (surrogate escapes from os.fsdecode or tarfile) as
    backslash escapes: a name to show, log and list (those writers take UTF-8 only)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _index_safe(text):
    """text without white space (the index's separator) or bytes that are not UTF-8, which
    would break the whole shard's index: %XX escapes and backslash escapes instead. Only names
    and extensions change; offsets and sizes find the member."""
    return "".join(f"%{ord(c):02X}" if c.isspace() else c for c in _escaped(text))


def write_dali_index(path, samples):
    """DALI's webdataset index: a 'v1.2 <count>' line, then per sample one line of
    'ext offset size name' groups, one group per member. Written atomically."""
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) for comps in samples]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_dali_index(path):
    """Per sample, a list of (ext, offset, size, name) read from a DALI index file."""
    with open(path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != DALI_INDEX_VERSION:
            raise ValueError(f"{path}: expected a DALI '{DALI_INDEX_VERSION}' index, got {header}")
        out = []
        for line in f:
            t = line.split()
            if len(t) % 4:
                raise ValueError(f"{path}: malformed line {line.strip()!r}")
            if t:
                out.append([(t[i], int(t[i + 1]), int(t[i + 2]), t[i + 3])
                            for i in range(0, len(t), 4)])
    return out


# ---- the validation cache -------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    path: str
    offset: int
    size: int
    name: str

    read = Sample.read


class _ValidationCache:
    """Check results per file and checker, reused while the file's size and mtime are unchanged.
    One JSON file per dataset under `cache_dir` (default $CCKERNELS_CACHE or ~/.cache/cckernels)."""

    def __init__(self, root, format, cache_dir):
        key = hashlib.sha1(f"{format}:{root}".encode()).hexdigest()[:16]
        self.path = cache_root(cache_dir) / "index" / f"{key}.json"
        try:
            cached = json.loads(self.path.read_text())
            self.entries = cached["entries"] if cached.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}
        self.used, self.changed = set(), False

    def check(self, candidates, checker, check_many):
        """Per candidate, None or the reason it is unusable, from the cache or from
        check_many(list of candidates) for those not cached; `checker` names the check."""
        stamps = {}
        for c in candidates:
            if c.path not in stamps:
                st = os.stat(c.path)
                stamps[c.path] = [st.st_size, st.st_mtime_ns]
        # PIL's keys carry no suffix, as before there were two checkers.
        keys = [f"{c.path}:{c.offset}" + ("" if checker == "pil" else f":{checker}")
                for c in candidates]
        self.used.update(keys)
        todo = [i for i, k in enumerate(keys)
                if k not in self.entries or self.entries[k][:2] != stamps[candidates[i].path]]
        transient = {}  # files that could not be read (permissions, I/O): checked again next run
        if todo:
            log.info("data: checking %d of %d images with %s (%s)", len(todo), len(candidates), checker,
                     f"the other {len(candidates) - len(todo)} were checked before" if len(todo) < len(candidates)
                     else f"results cached in {self.path}")
            checked = tqdm(check_many([candidates[i] for i in todo]), total=len(todo), unit="img",
                           desc=f"checking images ({checker})", disable=len(todo) < 1000)  # where it takes a while
            for i, reason in zip(todo, checked):
                entry = stamps[candidates[i].path] + [reason]
                if reason is not None and reason.startswith(UNREADABLE):
                    transient[keys[i]] = entry
                else:
                    self.entries[keys[i]] = entry
            self.changed = True
        return [transient.get(k, self.entries.get(k))[2] for k in keys]

    def save(self):
        """Writes the entries checked in this run (those of deleted files are dropped)."""
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        entries = {k: self.entries[k] for k in self.used if k in self.entries}
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}))
        os.replace(tmp, self.path)
