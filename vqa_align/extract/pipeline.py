"""``vqa-align extract``: pictures -> the HDF5 region-feature store, with any registered backbone.

Pipeline (one process per GPU under ``torchrun``, else one process)::

    list + id the images -> DataLoader workers decode/resize (decode_image + backbone.preprocessor)
      -> backbone.extract on batches (GPU + autocast when there is one) -> finished *parts*
      -> one merged store (<out>.tmp, renamed to <out>) + <out>.ids.json (image id -> file)

Parts. The sorted image list is cut into parts of ``part_size`` images; part k is done by rank
k mod world_size and written to ``<out>.parts/part-<k>.h5`` (atomically, by the store writer),
then marked done by ``part-<k>.json`` (its ids and the files it skipped). An interrupted run
started again with the same inputs skips every part that has its marker, so at most one part
per rank is redone. When all parts are done, rank 0 merges them in order into the store, one
part at a time (memory stays bounded by one part's write buffer), and deletes the parts.

Bad input never stops a run: a file that is unreadable, truncated or not an image is skipped
with one line naming it and the reason, and counted at the end. EXIF orientation is applied;
grayscale, palette, CMYK, 16-bit and RGBA pictures are converted to RGB (alpha over white);
pictures larger than ``max_side`` are downscaled while decoding (boxes still refer to the
original pixel size).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from vqa_align.errors import UserError
from vqa_align.progress import progress_bar
from vqa_align.extract.backbones import Backbone, ExtractorInfo, ImageRegions, build_backbone
from vqa_align.extract.images import DEFAULT_MAX_SIDE, BadImage, decode_image
from vqa_align.extract.feature_store import IDS_SUFFIX, TMP_SUFFIX, FeatureStore, FeatureStoreWriter, store_files
from vqa_align.paths import check_output_paths
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, MAX_META_BYTES, read_json, read_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_PART_SIZE = 256  # images per part: the most an interruption can cost per rank
HASH_ID_BASE = 10**15  # ids of non-COCO names: HASH_ID_BASE + 48-bit hash (< 2**53: exact in JSON/float64)
HASH_ID_BITS = 48
PARTS_SUFFIX = ".parts"
MANIFEST = "manifest.json"
# COCO_train2014_000000123456.jpg -> 123456 (and 000000123456.jpg, as in COCO 2017)
_COCO_RE = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?(\d+)\.[A-Za-z]+$")



# ----------------------------------------------------------------------------------------------
# Inputs and ids
# ----------------------------------------------------------------------------------------------


def image_id_for(name: str) -> int:
    """Stable image id of a file name: the COCO id when the name is a COCO file name, else a hash.

    ``COCO_val2014_000000000042.jpg``, ``000000000042.jpg`` and ``42.png`` -> 42 (as the ``.npz``
    converter does);
    any other name -> ``HASH_ID_BASE`` + the first 48 bits of its sha1 (stable across runs and
    machines; the mapping is written beside the store).
    """
    m = _COCO_RE.match(Path(name).name)
    if m is not None:
        return int(m.group(1))
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return HASH_ID_BASE + (int.from_bytes(digest[:8], "big") >> (64 - HASH_ID_BITS))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(inputs: Sequence[str | Path]) -> list[tuple[int, Path]]:
    """(image id, path) of every picture named by ``inputs``, sorted by path.

    An input is a folder (its image files, recursively), a glob pattern, a ``.txt`` file listing
    one path per line (relative to the text file), or an image file. The id comes from the path
    relative to its folder (a file's own name otherwise), so that ``a/x.jpg`` and ``b/x.jpg`` differ.
    """
    found: list[tuple[str, Path]] = []  # (name the id is computed from, path)
    for raw in inputs:
        item = Path(raw).expanduser()
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and _is_image_name(p))
            if not files:
                raise UserError(f"{item}: folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found += [(p.relative_to(item).as_posix(), p) for p in files]
        elif item.is_file() and item.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in read_text(item, MAX_DATASET_JSON_BYTES, error=UserError).splitlines()]
            for ln in lines:
                if ln and not ln.startswith("#"):
                    p = Path(ln).expanduser()
                    p = p if p.is_absolute() else item.parent / p
                    found.append((p.name, p))  # missing ones are skipped later, with a line each
        elif item.is_file():
            found.append((item.name, item))
        elif any(ch in str(raw) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise UserError(f"{raw}: the pattern matches no file")
            found += [(m.name, m) for m in matches]
        else:
            raise UserError(f"{raw}: no such file, folder or pattern")
    if not found:
        raise UserError("no input images: give folders, glob patterns, a .txt list or image files")
    by_id: dict[int, Path] = {}
    for name, path in found:
        image_id = image_id_for(name)
        other = by_id.get(image_id)
        if other is not None and other.resolve() != path.resolve():
            raise UserError(f"{path} and {other} get the same image id {image_id} (same file name); "
                            "pass their parent folder instead so their relative paths tell them apart")
        by_id[image_id] = path
    return sorted(by_id.items(), key=lambda kv: str(kv[1]))


class ImageFiles(torch.utils.data.Dataset):
    """Decoded + preprocessed pictures for DataLoader workers: item -> (index, input | None, size, error)."""

    def __init__(self, items: list[tuple[int, Path]], preprocess: Callable[[Image.Image], Any], max_side: int):
        self.items, self.preprocess, self.max_side = items, preprocess, max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any, tuple[int, int], str | None]:
        _, path = self.items[i]
        try:
            image, size = decode_image(path, self.max_side)
            return i, self.preprocess(image), size, None
        except BadImage as err:
            return i, None, (0, 0), str(err)
        except Exception as err:  # a backbone's preprocessing failing on an odd picture: skip it too
            return i, None, (0, 0), f"{type(err).__name__}: {err}"


def _as_list(batch: list[Any]) -> list[Any]:
    return batch  # inputs may differ in size (detectors): the backbone batches them itself


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class ExtractOptions:
    batch_size: int = 16  # CPU sweet spot for the grid backbones; raise it on a GPU
    num_workers: int = 2
    part_size: int = DEFAULT_PART_SIZE
    max_side: int = DEFAULT_MAX_SIDE
    dtype: str = "float16"
    progress: bool = True


@dataclass
class ExtractResult:
    path: Path | None  # the merged store (None on ranks other than 0, or before the merge)
    images: int = 0
    regions: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    parts_reused: int = 0
    seconds: float = 0.0


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def extract_files(out: Path) -> list[Path]:
    """Every path an extraction into ``out`` writes: the store (and its temporary file), the ids
    file (and its temporary file), the parts folder."""
    ids = out.with_name(out.name + IDS_SUFFIX)
    return [*store_files(out), ids, ids.with_name(ids.name + TMP_SUFFIX), parts_dir(out)]


def _list_digest(items: list[tuple[int, Path]]) -> str:
    h = hashlib.sha256()
    for image_id, path in items:
        h.update(f"{image_id}\t{path}\n".encode())
    return h.hexdigest()


def _check_manifest(folder: Path, info: ExtractorInfo, digest: str, part_size: int, dtype: str) -> None:
    """Create the parts folder's manifest, or check that a resumed run matches it."""
    want = {"extractor": json.loads(info.to_json()), "inputs_sha256": digest, "part_size": part_size, "dtype": dtype}
    path = folder / MANIFEST
    if path.is_file():
        have = read_json(path, MAX_META_BYTES, expect=dict)
        have_info = ExtractorInfo.from_json(json.dumps(have.get("extractor", {})), f"{path}: 'extractor'")
        if have_info.key() != info.key():
            raise UserError(f"{folder}: unfinished parts come from {have_info.describe()}, not {info.describe()}; "
                            "delete the folder or pass --overwrite to start again")
        if have.get("inputs_sha256") != digest or have.get("part_size") != part_size or have.get("dtype") != dtype:
            raise UserError(f"{folder}: unfinished parts were made for another image list, part size or dtype; "
                            "delete the folder or pass --overwrite to start again")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(want, indent=2))
    os.replace(tmp, path)


def _part_paths(folder: Path, k: int) -> tuple[Path, Path]:
    return folder / f"part-{k:06d}.h5", folder / f"part-{k:06d}.json"


class _PartWriter:
    """Writes this rank's parts, one open at a time: a part's store, then its marker (written last,
    so a part with a marker is complete). Images arrive in part order."""

    def __init__(self, folder: Path, options: ExtractOptions, info: ExtractorInfo, num_items: int) -> None:
        self.folder, self.options, self.info, self.num_items = folder, options, info, num_items
        self.writer: FeatureStoreWriter | None = None
        self.k, self.ids, self.skipped, self.left = -1, [], [], 0

    def start(self, k: int) -> None:
        h5, _ = _part_paths(self.folder, k)
        self.writer = FeatureStoreWriter(h5, dtype=self.options.dtype, source=f"vqa-align extract {self.info.name}",
                                         overwrite=True, extractor=self.info)
        self.k, self.ids, self.skipped = k, [], []
        size = self.options.part_size
        self.left = min((k + 1) * size, self.num_items) - k * size

    def add(self, k: int, image_id: int, path: Path, regions: ImageRegions, size: tuple[int, int]) -> None:
        self._enter(k)
        assert self.writer is not None
        self.writer.add(image_id, regions.features, regions.boxes, size, record=str(path), labels=regions.labels)
        self.ids.append(image_id)
        self._leave()

    def skip(self, k: int, path: Path, reason: str) -> None:
        self._enter(k)
        self.skipped.append([str(path), reason])
        self._leave()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _enter(self, k: int) -> None:
        if k != self.k:
            self.start(k)

    def _leave(self) -> None:
        self.left -= 1
        if self.left == 0:
            self._finish()

    def _finish(self) -> None:
        h5, marker = _part_paths(self.folder, self.k)
        assert self.writer is not None
        if self.ids:
            self.writer.close()
        else:
            self.writer.abort()  # every file of the part was skipped: the marker alone records that
            h5.unlink(missing_ok=True)
        self.writer = None
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"ids": self.ids, "skipped": self.skipped, "store": h5.name if self.ids else None}))
        os.replace(tmp, marker)  # written last: the part is done


def extract_parts(
    items: list[tuple[int, Path]],
    backbone: Backbone,
    out: Path,
    options: ExtractOptions,
    rank: int = 0,
    world_size: int = 1,
) -> ExtractResult:
    """Extract this rank's unfinished parts of ``items`` into ``<out>.parts/``."""
    t0 = time.perf_counter()
    info = backbone.info
    folder = parts_dir(out)
    if rank == 0:
        _check_manifest(folder, info, _list_digest(items), options.part_size, options.dtype)
    else:
        _wait_for(folder / MANIFEST)
    num_parts = (len(items) + options.part_size - 1) // options.part_size
    mine = [k for k in range(num_parts) if k % world_size == rank]
    todo = [k for k in mine if not _part_paths(folder, k)[1].is_file()]
    result = ExtractResult(path=None, parts_reused=len(mine) - len(todo))
    todo_items = [(k, j) for k in todo for j in range(k * options.part_size, min((k + 1) * options.part_size, len(items)))]
    if result.parts_reused and options.progress:
        print(f"resuming: {result.parts_reused} finished part(s) of this run are kept", file=sys.stderr)
    dataset = ImageFiles([items[j] for _, j in todo_items], backbone.preprocessor(), options.max_side)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=options.batch_size, num_workers=options.num_workers, collate_fn=_as_list,
        pin_memory=backbone.device.type == "cuda", persistent_workers=False,
        prefetch_factor=2 if options.num_workers > 0 else None,
    )
    bar = progress_bar(total=len(dataset), unit="img", enabled=options.progress,
                       desc=f"extract {info.name}" + (f" [rank {rank}]" if world_size > 1 else ""))
    parts = _PartWriter(folder, options, info, len(items))
    try:
        for batch in loader:
            good = [(i, x, size) for i, x, size, err in batch if err is None]
            regions = backbone.extract([x for _, x, _ in good], [size for _, _, size in good]) if good else []
            by_index = {i: (r, size) for (i, _, size), r in zip(good, regions)}
            for i, _, _, err in batch:
                k, j = todo_items[i]
                image_id, path = items[j]
                if err is not None:
                    bar.write(f"skipped {path}: {err}", file=sys.stderr)
                    parts.skip(k, path, err)
                    result.skipped.append((str(path), err))
                else:
                    r, size = by_index[i]
                    parts.add(k, image_id, path, r, size)
                    result.images += 1
                    result.regions += len(r.features)
            bar.update(len(batch))
    except BaseException:
        parts.abort()
        raise
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _wait_for(path: Path, timeout: float = 600.0) -> None:
    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout:
            raise UserError(f"timed out waiting for {path} (written by rank 0)")
        time.sleep(0.2)


def merge_parts(items: list[tuple[int, Path]], out: Path, options: ExtractOptions, overwrite: bool = False) -> ExtractResult:
    """Merge the finished parts of ``<out>.parts`` into ``out`` (+ ``out.ids.json``) and delete them."""
    folder = parts_dir(out)
    manifest = read_json(folder / MANIFEST, MAX_META_BYTES, expect=dict)
    info = ExtractorInfo.from_json(json.dumps(manifest.get("extractor")), f"{folder / MANIFEST}: 'extractor'")
    num_parts = (len(items) + options.part_size - 1) // options.part_size
    result = ExtractResult(path=out)
    missing = [k for k in range(num_parts) if not _part_paths(folder, k)[1].is_file()]
    if missing:
        raise UserError(f"{folder}: parts {missing[:5]} are not finished; run the same command again to resume")
    names = {image_id: str(path) for image_id, path in items}
    kept: dict[str, str] = {}  # image id -> file, of the images in the store
    with FeatureStoreWriter(out, dtype=options.dtype, source=f"vqa-align extract {info.name}",
                            overwrite=overwrite, extractor=info) as writer:
        for k in range(num_parts):
            h5, marker = _part_paths(folder, k)
            done = read_json(marker, MAX_META_BYTES, expect=dict)
            result.skipped += [tuple(s) for s in done["skipped"]]
            if done["store"] is None:
                continue
            part = FeatureStore(folder / done["store"])
            for row, image_id in enumerate(part.image_ids):
                feats, boxes = part.read_row(row)
                labels = part.read_labels(row)
                w, h = (int(v) for v in part.image_sizes[row])
                writer.add(int(image_id), feats, boxes, (w, h), record=str(h5), labels=labels)
                kept[str(int(image_id))] = names[int(image_id)]
                result.images += 1
                result.regions += len(feats)
            part.close()
        ids_tmp = out.with_name(out.name + IDS_SUFFIX + TMP_SUFFIX)
        ids_tmp.write_text(json.dumps(kept, indent=1))
    os.replace(ids_tmp, out.with_name(out.name + IDS_SUFFIX))
    shutil.rmtree(folder, ignore_errors=True)
    return result


def extract_images(
    items: list[tuple[int, Path]],
    backbone: Backbone,
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    sources: Sequence[str | Path] = (),
) -> ExtractResult:
    """Extract ``items`` (image id, path) with ``backbone`` into the store ``out``; resumable.

    With ``world_size`` > 1 every rank calls this with the same items; ``barrier`` (e.g.
    ``torch.distributed.barrier``) waits for all ranks before rank 0 merges. ``sources``: the
    folders and lists the items were found in (no output may lie in them, nor be an item).
    """
    options = options or ExtractOptions()
    out = Path(out)
    if not items:
        raise UserError("no input images")
    check_output_paths(extract_files(out), [*sources, *(path for _, path in items)])
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if overwrite and rank == 0 and parts_dir(out).exists():
        _drop_stale_parts(out, backbone.info, items, options)
    result = extract_parts(items, backbone, out, options, rank, world_size)
    if barrier is not None:
        barrier()
    if rank != 0:
        return result
    merged = merge_parts(items, out, options, overwrite=overwrite)
    merged.seconds, merged.parts_reused = result.seconds, result.parts_reused
    return merged


def _drop_stale_parts(out: Path, info: ExtractorInfo, items: list[tuple[int, Path]], options: ExtractOptions) -> None:
    """--overwrite restarts unless the parts are of this very run (then they are resumed)."""
    try:
        _check_manifest(parts_dir(out), info, _list_digest(items), options.part_size, options.dtype)
    except (UserError, ValueError, KeyError, OSError):
        shutil.rmtree(parts_dir(out), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_param_items(items: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        params[key.strip()] = value.strip()
    return params


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def run_extract(args: argparse.Namespace) -> int:
    from vqa_align.extract.backbones import BACKBONES, backbone_class, make_params

    if args.list:
        for name in BACKBONES:
            try:
                cls = backbone_class(name)
                print(f"{name:20s} {cls.summary}")
            except UserError as err:
                print(f"{name:20s} (unavailable: {err})")
        return 0
    if args.backbone is None:
        raise UserError("--backbone is required (see --list)")
    params = parse_param_items(args.param)
    if args.download:
        cls = backbone_class(args.backbone)
        where = cls.download(make_params(args.backbone, params), Path(args.weights_dir) if args.weights_dir else None)
        if where is not None:
            print(f"{args.backbone}: weights in {where}")
        return 0
    if args.out is None:
        raise UserError("--out is required: the HDF5 feature store to write")
    items = list_images(args.images)
    sources = [p for p in args.images if Path(p).exists()]  # the folders and lists, not the glob patterns
    # Checked here too (extract_images checks again for its other callers): before the backbone loads.
    check_output_paths(extract_files(Path(args.out)), [*sources, *(path for _, path in items)])
    pick_device(args.device)  # a bad --device is an error before any work
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    barrier = None
    if world_size > 1:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        barrier = dist.barrier
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    device = pick_device(args.device, local_rank)
    backbone = build_backbone(args.backbone, params, device)
    options = ExtractOptions(batch_size=args.batch_size, num_workers=args.workers, part_size=args.part_size,
                             max_side=args.max_side, dtype=args.dtype, progress=not args.quiet)
    if rank == 0:
        print(f"{len(items)} image(s) -> {args.out} with {backbone.info.describe()} on {device}", file=sys.stderr)
    try:
        result = extract_images(items, backbone, args.out, options, overwrite=args.overwrite, rank=rank,
                                world_size=world_size, barrier=barrier, sources=sources)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        rate = result.images / result.seconds if result.seconds > 0 else float("nan")
        print(f"wrote {result.images} image(s), {result.regions} regions to {result.path} "
              f"({rate:.1f} images/s this run); ids: {Path(args.out).name}{IDS_SUFFIX}")
        if result.skipped:
            print(f"skipped {len(result.skipped)} file(s) that could not be read as pictures (listed above)")
    return 0
