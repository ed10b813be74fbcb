"""Data sources (recipe ``data.source``): each lists its items up front and loads one item's image on demand.

An :class:`Item` is one image with its captions (a training pair per caption). ``Source.load(item.ref)`` returns a
``PIL.Image`` (or a ``[C, H, W]`` tensor for the digits and scenes) and may raise for an unreadable image: the caller skips and
reports that item. Listing is cheap (captions only); a missing source, column or split raises
:class:`~apexctl.errors.BadInput` with one line naming the path/key and what is allowed.

Sources are used from DataLoader worker processes (fork), so file handles are opened lazily per process.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexctl.errors import BadInput, read_text
from apexctl.recipe import DataSpec

SOURCES = ("digits", "scenes", "folder", "parquet", "datasets", "hub", "prompts")


@dataclass(frozen=True)
class Item:
    """One source item. ``index``: position in the source (stable); ``key``: how reports name it."""

    index: int
    key: str
    captions: tuple[str, ...]
    ref: Any = None
    seed: int | None = None


@dataclass
class Source:
    """Base: ``items`` in source order; ``extra_prompts`` are encoded too though no item uses them (eval prompts)."""

    name: str
    items: list[Item]
    extra_prompts: list[str] = field(default_factory=list)
    #: items the listing itself rejected (bad metadata lines): (index, key, reason)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)

    def load(self, ref: Any) -> Any:  # pragma: no cover - every source overrides it
        raise NotImplementedError


def to_pil(value: Any, base: Path | None = None):
    """An image cell (PIL image, bytes, ``{"bytes", "path"}`` dict as datasets stores it, or a path) → decoded RGB PIL."""
    from PIL import Image

    if isinstance(value, Image.Image):
        img = value
    else:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, os.PathLike)):
            p = Path(value)
            img = Image.open(p if p.is_absolute() or base is None else base / p)
        else:
            raise ValueError(f"unsupported image value of type {type(value).__name__}")
    img.load()  # decode now: a truncated or corrupt file raises here, inside the caller's try
    return img.convert("RGB")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# -- digits ------------------------------------------------------------------------------------------------------
class DigitsSource(Source):
    def __init__(self, spec: DataSpec) -> None:
        from apexctl.data import digits

        split = digits.load_split(holdout=spec.holdout, seed=spec.seed)
        by_image: dict[int, list[str]] = {}
        for i, p in digits.training_pairs(split.train_labels, seed=spec.seed):
            by_image.setdefault(i, []).append(p)
        items = [Item(i, f"digit {i}", tuple(by_image[i]), ref=i) for i in range(split.train_images.shape[0])]
        super().__init__("digits", items, extra_prompts=digits.all_prompts())
        self.images = split.train_images

    def load(self, ref: int):
        return self.images[ref]


# -- scenes (coloured digits at positions, apexctl.data.scenes) ------------------------------------------------------
class ScenesSource(DigitsSource):
    def __init__(self, spec: DataSpec) -> None:
        from apexctl.data import digits, scenes

        train = scenes.train_scenes(digits.load_split(holdout=spec.holdout, seed=spec.seed), seed=spec.seed)
        by_image: dict[int, list[str]] = {}
        for i, p in scenes.training_pairs(train.digits):
            by_image.setdefault(i, []).append(p)
        items = [Item(i, f"scene {i}", tuple(by_image[i]), ref=i) for i in range(len(train.digits))]
        Source.__init__(self, "scenes", items, extra_prompts=scenes.all_prompts())
        self.images = train.images


# -- image folder with metadata.jsonl -----------------------------------------------------------------------------
class FolderSource(Source):
    def __init__(self, spec: DataSpec) -> None:
        root = Path(spec.path or "")
        meta = root / "metadata.jsonl"
        if not root.is_dir():
            raise BadInput(f"data.path {root}: no such folder (data.source = 'folder' needs images + metadata.jsonl)")
        if not meta.is_file():
            raise BadInput(f"{meta}: missing (data.source = 'folder' needs metadata.jsonl with file_name and text)")
        items, rejected = [], []
        seen_text = False
        for n, raw in enumerate(meta.read_bytes().splitlines()):
            if not raw.strip():
                continue
            index = len(items) + len(rejected)
            try:
                line = raw.decode("utf-8")  # a line that is not UTF-8 is skipped and reported, not read as "�"
                row = json.loads(line)
                name = row["file_name"]
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                why = "bad metadata line (needs UTF-8 JSON with file_name)"
                rejected.append((index, f"metadata.jsonl line {n + 1}", why))
                continue
            if not isinstance(name, str) or not name.strip():  # null, a number, "": not a file (was item "None")
                why = f"file_name = {json.dumps(name)} (needs the image's file name)"
                rejected.append((index, f"metadata.jsonl line {n + 1}", f"bad metadata line: {why}"))
                continue
            seen_text = seen_text or spec.text_column in row
            items.append(Item(index, str(name), (_text(row.get(spec.text_column)),), ref=str(name)))
        if items and not seen_text:
            raise BadInput(f"{meta}: no line has the text column '{spec.text_column}' (data.text_column)")
        super().__init__("folder", items, rejected=rejected)
        self.root = root

    def load(self, ref: str):
        return to_pil(ref, self.root)


# -- parquet --------------------------------------------------------------------------------------------------------
def parquet_files(path: str) -> list[Path]:
    """A file, a folder (all ``*.parquet`` below it) or a glob → sorted parquet files; none → BadInput."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    else:
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    if not files:
        raise BadInput(f"data.path {path}: no parquet files (give a .parquet file, a folder or a glob)")
    return files


class ParquetSource(Source):
    def __init__(self, spec: DataSpec) -> None:
        import pyarrow.parquet as pq

        self.files = parquet_files(spec.path or "")
        self.image_column = spec.image_column
        items: list[Item] = []
        self._row_groups: list[list[int]] = []  # first row of each row group, per file
        for fi, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a non-parquet file
                raise BadInput(f"{f}: not a readable parquet file ({type(e).__name__})") from None
            names = pf.schema_arrow.names
            for col, key in ((spec.image_column, "image_column"), (spec.text_column, "text_column")):
                if col not in names:
                    raise BadInput(f"{f}: no column '{col}' (data.{key}; columns: {', '.join(names)})")
            texts = pf.read(columns=[spec.text_column]).column(0).to_pylist()
            starts, acc = [], 0
            for g in range(pf.num_row_groups):
                starts.append(acc)
                acc += pf.metadata.row_group(g).num_rows
            self._row_groups.append(starts)
            for r, t in enumerate(texts):
                items.append(Item(len(items), f"{f.name} row {r}", (_text(t),), ref=(fi, r)))
        super().__init__("parquet", items)
        self._open: dict = {}

    def load(self, ref: tuple[int, int]):
        import bisect

        import pyarrow.parquet as pq

        fi, row = ref
        g = bisect.bisect_right(self._row_groups[fi], row) - 1
        key = (os.getpid(), fi, g)
        if key not in self._open:  # one row group per process: a DataLoader worker reads contiguous rows
            self._open.clear()
            pf = pq.ParquetFile(self.files[fi])
            self._open[key] = pf.read_row_group(g, columns=[self.image_column]).column(0)
        return to_pil(self._open[key][row - self._row_groups[fi][g]].as_py(), self.files[fi].parent)


# -- datasets (load_from_disk) and hub (load_dataset) ---------------------------------------------------------------
class DatasetSource(Source):
    def __init__(self, spec: DataSpec, ds: Any, where: str, name: str) -> None:
        import datasets

        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise BadInput(f"{where}: no split '{spec.split}' (data.split; splits: {', '.join(ds)})")
            ds = ds[spec.split]
        names = list(ds.column_names)
        for col, key in ((spec.image_column, "image_column"), (spec.text_column, "text_column")):
            if col not in names:
                raise BadInput(f"{where}: no column '{col}' (data.{key}; columns: {', '.join(names)})")
        if isinstance(ds.features.get(spec.image_column), datasets.Image):
            # decode ourselves, so a corrupt image is one skipped item instead of an exception inside datasets
            ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))
        texts = list(ds[spec.text_column])
        items = [Item(i, f"row {i}", (_text(t),), ref=i) for i, t in enumerate(texts)]
        super().__init__(name, items)
        self.ds, self.image_column = ds, spec.image_column

    def load(self, ref: int):
        return to_pil(self.ds[int(ref)][self.image_column])


def _load_from_disk(spec: DataSpec) -> DatasetSource:
    import datasets

    path = spec.path or ""
    if not Path(path).is_dir():
        raise BadInput(f"data.path {path}: no such folder (data.source = 'datasets' needs a save_to_disk folder)")
    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise BadInput(f"data.path {path}: not a datasets folder ({type(e).__name__})") from None
    return DatasetSource(spec, ds, path, "datasets")


def _load_hub(spec: DataSpec) -> DatasetSource:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, split=spec.split)
    except Exception as e:  # network, auth and missing-id errors come in many types; one line each way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInput(f"data.path {spec.path}: cannot load hub dataset ({type(e).__name__}: {first})") from None
    return DatasetSource(spec, ds, f"hub:{spec.path}", "hub")


# -- prompts only (the teacher synthesises the images) --------------------------------------------------------------
def read_prompts(path: str, text_column: str = "text") -> list[str]:
    """Prompts from a ``.txt`` (one per line, blank lines ignored) or ``.jsonl`` (a string or an object with
    ``text_column`` per line). Prompts are kept as written; empty ones are rejected later with a reason."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"data.path {p}: no such prompts file (.txt, one prompt per line, or .jsonl)")
    lines = read_text(p, "data.path").splitlines()  # not UTF-8: one line naming the file (was: mangled prompts)
    if p.suffix.lower() != ".jsonl":
        return [ln for ln in lines if ln.strip()]
    out = []
    for n, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            raise BadInput(f"{p}: line {n + 1} is not JSON") from None
        if isinstance(row, dict):
            if text_column not in row:
                raise BadInput(f"{p}: line {n + 1} has no '{text_column}' (data.text_column)")
            row = row[text_column]
        out.append(_text(row))
    return out


class PromptSource(Source):
    def __init__(self, spec: DataSpec) -> None:
        synth = spec.synthesize
        assert synth is not None  # the recipe validator requires it for this source
        prompts = read_prompts(spec.path or "", spec.text_column)
        k = synth.images_per_prompt
        items = [
            Item(i * k + j, f"prompt {i} image {j}", (p,), ref=None, seed=synth.seed + k * i + j)
            for i, p in enumerate(prompts)
            for j in range(k)
        ]
        super().__init__("prompts", items)

    def load(self, ref: Any):  # pragma: no cover - prompts have no images to load
        raise RuntimeError("a prompts source has no images; they are synthesised by the teacher")


def open_source(spec: DataSpec) -> Source:
    """The recipe's data source, listed (captions read, images not yet)."""
    opener = {
        "digits": DigitsSource,
        "scenes": ScenesSource,
        "folder": FolderSource,
        "parquet": ParquetSource,
        "datasets": _load_from_disk,
        "hub": _load_hub,
        "prompts": PromptSource,
    }.get(spec.source)
    if opener is not None:
        return opener(spec)
    raise BadInput(f"data.source = {spec.source!r}: expected one of {', '.join(SOURCES)}")
