"""Every data source ends as uint8 image tensors (N, C, H, W), int64 labels and class names.

Sources: torchvision downloads (cifar10, cifar100, mnist, fashion-mnist), local copies of
the CIFAR python folders, a folder of images with one subfolder per class, and
scikit-learn's bundled 8×8 digits (works offline). Everything is decoded once and held
in memory, so training can index batches straight out of one tensor.
"""
from __future__ import annotations

import csv
import difflib
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CnnkitError, CnnkitWarning, DownloadError, SettingsError, first_line
from .progress import bar

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tiff", ".tif")
DOWNLOADABLE = ("cifar10", "cifar100", "mnist", "fashion-mnist")
BUILTIN = DOWNLOADABLE + ("digits",)
DEFAULT_FOLDER_SIZE = 32
DEFAULT_VAL_FRACTION = 0.2


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), or float32 multi-hot (N, K) for multi-label data
    files: list[Path] | None = None  # where each image was read from, for image files

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        files = [self.files[i] for i in index.tolist()] if self.files is not None else None
        return Split(self.images[index], self.labels[index], files)

    def head(self, n: int) -> torch.Tensor:
        return self.images[:n]

    def iterate(self, batches, device):
        """(index, uint8 images, labels) per batch of indices, on `device` (a split already
        there, as training moves it once, is not copied)."""
        for index in batches:
            index = index.to(self.labels.device, non_blocking=True)
            yield (index, self.images[index].to(device, non_blocking=True),
                   self.labels[index].to(device, non_blocking=True))


class _Files(torch.utils.data.Dataset):
    """Decode and resize one image file per item (in a DataLoader worker)."""

    def __init__(self, files: list[Path], size, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return read_image(self.files[i], self.size, self.channels)


@dataclass
class StreamSplit:
    """A split too big to hold decoded: files decoded, resized and batched by DataLoader
    worker processes (pinned memory, prefetching); the same batches as a Split would give."""
    files: list[Path]
    labels: torch.Tensor
    size: tuple[int, int]
    channels: int = 3
    workers: int = max(1, (os.cpu_count() or 2) - 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.channels, *self.size)

    def head(self, n: int) -> torch.Tensor:
        return torch.stack([read_image(f, self.size, self.channels) for f in self.files[:n]])

    def subset(self, index) -> "StreamSplit":
        index = torch.as_tensor(index, dtype=torch.long)
        return StreamSplit([self.files[i] for i in index.tolist()], self.labels[index],
                           self.size, self.channels, self.workers)

    def iterate(self, batches, device):
        loader = torch.utils.data.DataLoader(
            _Files(self.files, self.size, self.channels), batch_sampler=[b.tolist() for b in batches],
            num_workers=self.workers, pin_memory=torch.device(device).type == "cuda",
            prefetch_factor=4 if self.workers else None)
        for index, images in zip(batches, loader):
            yield (index.to(device), images.to(device, non_blocking=True),
                   self.labels[index].to(device))


@dataclass
class Dataset:
    name: str           # short name, used to name runs
    source: str         # what to pass to load_dataset to get this data again (absolute path)
    classes: list[str]
    train: Split
    val: Split          # a val/ folder, a held-out part of train, or the test split
    val_name: str       # "val", or "test" when the test split doubles as validation
    notes: list = field(default_factory=list)  # what the user should be told (e.g. streaming)
    test: Split | None = None  # a test split kept apart from validation (train/ val/ test/)
    held_out: bool = False     # val was drawn from train (--val-fraction), not given

    @property
    def splits(self) -> dict[str, Split]:
        """The splits `cnnkit eval --split` can name, each image in exactly one of them."""
        named = {"train": self.train, self.val_name: self.val}
        if self.test is not None:
            named["test"] = self.test
        return named

    @property
    def default_eval_split(self) -> str:
        """What a report is about unless told otherwise: the test split when there is one,
        else validation. Never all images: that would count the training images."""
        return "test" if "test" in self.splits else "val"

    @property
    def multi_label(self) -> bool:
        """Whether each image has a set of labels (multi-hot rows) rather than one class."""
        return self.train.labels.ndim == 2

    @property
    def in_channels(self) -> int:
        return self.val.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.val.images.shape[2:])


def default_data_dir() -> Path:
    return Path(os.environ.get("CNNKIT_DATA") or Path.home() / ".cache" / "cnnkit")


def load_dataset(source: str, *, data_dir: str | None = None, image_size: int | None = None,
                 val_fraction: float | None = None, seed: int = 0, strict: bool = False,
                 stream: bool | None = False, max_memory: float | None = None,
                 channels: int | None = None, multi_label: bool = False) -> Dataset:
    """Load a data source by name or path; see the module docstring for what is accepted.
    Image files are decoded into memory, or, with `stream` (or `stream=None` and more decoded
    bytes than `max_memory` GB, default a quarter of RAM), streamed from disk in training.
    `channels` (1 or 3) converts every image to greyscale or RGB; by default image files
    are RGB and the built-in sets keep their own. A CSV is multi-label when a label cell
    holds several labels (`cat|outdoor`), or with `multi_label`."""
    if multi_label:
        check_multi_label(source)
    key = source.lower()
    if key in DOWNLOADABLE:
        name, classes, train, test = _download(key, Path(data_dir) if data_dir else
                                               default_data_dir())
        src = key
    elif key == "digits":
        name, classes, train, test = ("digits", *_digits())
        src = key
    else:
        path = check_source(source)
        path = _find_cifar_folder(path) or path
        src = str(path.resolve())
        name = path.stem
        if path.is_file() or (path / "train").is_dir():
            return _file_dataset(path, image_size or DEFAULT_FOLDER_SIZE, strict, val_fraction,
                                 seed, stream, max_memory, channels or 3, multi_label)
        if (path / "data_batch_1").exists():
            classes, train, test = _local_cifar10(path)
        elif (path / "train").is_file() and (path / "meta").is_file():
            classes, train, test = _local_cifar100(path)
        else:
            return _file_dataset(path, image_size or DEFAULT_FOLDER_SIZE, strict, val_fraction,
                                 seed, stream, max_memory, channels or 3)

    def adapt(split: Split) -> Split:
        images = convert_channels(split.images, channels) if channels else split.images
        return Split(resize_images(images, image_size) if image_size else images, split.labels,
                     split.files)
    train, test = adapt(train), (adapt(test) if test is not None else None)
    if test is not None and val_fraction is None:
        return Dataset(name, src, classes, train, test, "test")
    return hold_out(Dataset(name, src, classes, train, train, "train", test=test),
                    val_fraction or DEFAULT_VAL_FRACTION, seed)


def same_source(a: str, b: str) -> bool:
    """Whether two --data values name the same data (a name, or a path spelled any way)."""
    if a.lower() in BUILTIN or b.lower() in BUILTIN:
        return a.lower() == b.lower()
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


NATIVE_INPUT = {"cifar10": (3, 32), "cifar100": (3, 32), "mnist": (1, 28),
                "fashion-mnist": (1, 28), "digits": (1, 8)}


def check_source(source: str) -> Path | None:
    """Fail fast, before anything loads, on a source that is neither a known data set nor an
    existing folder. Returns the folder for a path source."""
    if source.lower() in BUILTIN:
        return None
    path = Path(source).expanduser()
    if not path.exists():
        close = difflib.get_close_matches(source.lower(), BUILTIN, n=1, cutoff=0.75)
        if close and os.sep not in source:  # a mistyped data set name
            raise SettingsError(f"unknown data set {source!r} (did you mean {close[0]}?), "
                                f"and no such folder (looked in {path.absolute()})")
        raise SettingsError(f"no such folder: {source} (looked in {path.absolute()}); --data "
                            f"takes a folder, a CSV or a data set name ({', '.join(BUILTIN)})")
    if not path.is_dir() and path.suffix.lower() != ".csv":
        raise SettingsError(f"data source {source!r} is a file; pass a folder (an image "
                            "folder with one subfolder per class, or a CIFAR python folder) "
                            "or a CSV of path,label rows")
    return path


def check_multi_label(source: str) -> None:
    """Only a CSV holds sets of labels; folders and the built-in sets have one class an
    image."""
    if source.lower() in BUILTIN or Path(source).expanduser().suffix.lower() != ".csv":
        raise SettingsError(f"multi-label data is a CSV of path,label rows whose label cells "
                            f"hold labels separated by '|' (e.g. photo.jpg,cat|outdoor); "
                            f"{source} is not a CSV: drop --multi-label")


def expected_input(source: str, image_size: int | None, channels: int | None = None
                   ) -> tuple[int, int]:
    """(channels, size) the source will have, known without loading it."""
    native, size = NATIVE_INPUT.get(source.lower(), (3, DEFAULT_FOLDER_SIZE))
    return channels or native, image_size or size


def stratified_split(labels: torch.Tensor, fraction: float, seed: int):
    """Indices (train, val): `fraction` of each class held out, the same for the same seed.
    Multi-label rows are stratified by their rarest label (images with none form a group of
    their own), as iterative stratification starts: a common label ("animal") is spread
    over both splits anyway, a rare one only if it is what groups the rows."""
    from sklearn.model_selection import train_test_split

    if labels.ndim == 2:
        rarity = torch.where(labels > 0, labels.sum(0), torch.inf)
        labels = torch.where(labels.bool().any(1), rarity.argmin(1), labels.shape[1])
    y = labels.numpy()
    index = np.arange(len(y))
    counts = np.bincount(y)
    # sklearn can only stratify when every class has two members and val can hold each class.
    stratify = y if counts[counts > 0].min() >= 2 and len(y) * fraction >= (counts > 0).sum() \
        else None
    try:
        train_idx, val_idx = train_test_split(index, test_size=fraction, random_state=seed,
                                              stratify=stratify)
    except ValueError as e:
        raise CnnkitError(f"cannot hold out {fraction:g} of {len(y)} images for "
                          f"validation: {e}") from None
    return np.sort(train_idx), np.sort(val_idx)


def hold_out(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """`ds` with its training split cut in two, stratified: the rest trains, `fraction`
    validates (--val-fraction; and cnnkit tune, which chooses settings on images that the
    final run's evaluation never sees). Its validation split is dropped, its test split
    kept."""
    train_idx, val_idx = stratified_split(ds.train.labels, fraction, seed)
    val = ds.train.subset(val_idx)
    if isinstance(val, StreamSplit):  # held-out images are held in memory: drawn on
        val = Split(val.head(len(val)), val.labels, val.files)
    return Dataset(ds.name, ds.source, ds.classes, ds.train.subset(train_idx), val, "val",
                   ds.notes, test=ds.test, held_out=True)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """A uint8 batch as greyscale (ITU-R 601 luma, as PIL's "L") or RGB (grey repeated)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = [(chunk.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255)
           .to(torch.uint8) for chunk in images.split(4096)]
    return torch.cat(out)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch to size×size (antialiased), keeping uint8."""
    if tuple(images.shape[2:]) == (size, size):
        return images
    out = []
    for chunk in images.split(4096):  # bounded float memory for large data sets
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


# --- single images ------------------------------------------------------------------

def read_image(path: str | Path, size: int | tuple[int, int] | None, channels: int = 3
               ) -> torch.Tensor:
    """Decode one image file of any format and mode into uint8 (C, H, W).

    EXIF rotation is applied, the first frame of an animation is used, and the image is
    resized so its shorter side fits and then centre-cropped to `size` (the same
    treatment at training and at prediction). Raises OSError/ValueError for files
    that are not readable images.
    """
    with Image.open(path) as im:
        im.seek(0)
        if size is not None and im.format == "JPEG":
            # Let libjpeg decode a large photo at a reduced scale: far less time and memory.
            side = max(size) if not isinstance(size, int) else size
            im.draft(None, (side * 2, side * 2))
        im = ImageOps.exif_transpose(im)
        return image_to_tensor(im, size, channels)


def image_to_tensor(im: Image.Image, size, channels: int = 3) -> torch.Tensor:
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit and 32-bit greyscale: scale the full range down to 8 bits (PIL's own
        # conversion would clip everything above 255 to white).
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA") or "A" in im.getbands():
        # Composite transparency onto white rather than letting it turn black.
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        target = (size[1], size[0])  # PIL sizes are (width, height)
        if im.size != target:
            im = ImageOps.fit(im, target, method=Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# --- image folders --------------------------------------------------------------------

def image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Everything named like an image in `folder` (with `recursive`, in its subfolders
    too), in path order: what is not a readable image file (a dangling link, a folder named
    x.png) is listed, to be named when it fails to decode. Hidden names (.git, macOS's ._
    copies) are skipped, and links to folders not followed. One directory scan and no stat
    call per file: 10,000 files list in 40 ms."""
    found, pending = [], [os.fspath(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(e.path)
                if recursive and e.is_dir(follow_symlinks=False):
                    pending.append(e.path)
    found.sort(key=lambda path: path.split(os.sep))  # the order of Path objects
    return [Path(path) for path in found]


def _class_folder(root: Path, classes: list[str] | None = None):
    """(classes, files, labels) of a folder with one subfolder per class. With `classes`
    (a validation folder), its subfolders must be among them."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise CnnkitError(f"image folder {root} has no class subfolders; expected "
                          f"{root}/<class name>/<image files>")
    names = classes or [d.name for d in class_dirs]
    unknown = [d.name for d in class_dirs if d.name not in names]
    if unknown:
        raise CnnkitError(f"{root} has classes that train/ does not: {', '.join(unknown)}")
    files, labels, empty = [], [], []
    for d in class_dirs:
        found = image_files(d)
        if not found:
            empty.append(d.name)
        files += found
        labels += [names.index(d.name)] * len(found)
    if empty:
        raise CnnkitError(f"class folder(s) with no images in {root}: {', '.join(empty)} "
                          f"(image types: {' '.join(IMAGE_EXTENSIONS)})")
    return names, files, labels


def _csv_listing(path: Path, multi_label: bool = False):
    """(classes, files, labels) from a CSV of `path,label` rows (a header row is allowed);
    paths are relative to the CSV's folder. Labels are class indices, or, when a label cell
    holds several labels separated by '|' (or with `multi_label`), a float32 multi-hot
    tensor (N, K) over the sorted union of the labels; an empty cell is then no label."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "label"],
                                                               ["path", "labels"]):
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if not rows or bad:
        raise CnnkitError(f"{path}: expected rows of path,label"
                          + (f" (line {bad[0]} is not)" if bad else " (it has none)"))
    files = [(path.parent / r[0].strip()) for r in rows]
    cells = [r[1].strip() for r in rows]
    if not (multi_label or any("|" in c for c in cells)):
        classes = sorted(set(cells))
        index = {c: i for i, c in enumerate(classes)}
        return classes, files, [index[c] for c in cells]
    sets = [{label.strip() for label in c.split("|")} - {""} for c in cells]
    classes = sorted(set().union(*sets))
    if not classes:
        raise CnnkitError(f"{path}: no row has a label")
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.zeros(len(rows), len(classes))
    for i, labels_of_row in enumerate(sets):
        labels[i, [index[c] for c in labels_of_row]] = 1.0
    return classes, files, labels


def _take(labels, keep: list[int]) -> torch.Tensor:
    """The labels of the kept images: int64 class indices (N,), or multi-hot rows (N, K)."""
    return torch.as_tensor(labels)[torch.as_tensor(keep, dtype=torch.long)]


def _decode_all(files, labels, size, strict: bool, where, channels: int = 3) -> Split:
    def decode(path):
        try:
            if path.is_dir():
                raise IsADirectoryError("a directory, not an image")
            return read_image(path, size, channels)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            return f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        decoded = list(bar(pool.map(decode, files), total=len(files), unit="img",
                           desc=f"decoding {Path(where).name}"))
    keep = _report_unreadable([d if isinstance(d, str) else None for d in decoded], strict,
                              where)
    return Split(torch.stack([decoded[i] for i in keep]), _take(labels, keep),
                 [Path(files[i]) for i in keep])


def _check_readable(path: Path) -> str | None:
    """Open and verify a file without decoding its pixels (for streamed data sets)."""
    try:
        if path.is_dir():
            raise IsADirectoryError("a directory, not an image")
        with Image.open(path) as im:
            im.verify()
        return None
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
            SyntaxError) as e:
        return f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _report_unreadable(problems: list, strict: bool, where) -> list[int]:
    bad = [p for p in problems if p]
    if bad:
        if strict:
            raise CnnkitError(f"{len(bad)} unreadable image(s) with --strict: {'; '.join(bad)}")
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {'; '.join(bad)}",
                      CnnkitWarning, stacklevel=4)
    keep = [i for i, p in enumerate(problems) if not p]
    if not keep:
        raise CnnkitError(f"no readable images in {where}")
    return keep


def memory_budget() -> float:
    """Bytes of decoded images to hold in memory at most: a quarter of RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    except (ValueError, OSError, AttributeError):
        return 4e9


def _file_dataset(path: Path, size: int, strict: bool, val_fraction, seed, stream,
                  max_memory, channels: int = 3, multi_label: bool = False) -> Dataset:
    """An image folder (class subfolders), a CSV, or a folder with train/ and any of val/
    and test/ (Ultralytics' classify layout): train/ trains, val/ validates, test/ is kept
    for `cnnkit eval --split test`; test/ alone doubles as validation."""
    if path.is_file():
        classes, files, labels = _csv_listing(path, multi_label)
        parts = {"train": (files, labels)}
    elif (path / "train").is_dir():
        classes, files, labels = _class_folder(path / "train")
        parts = {"train": (files, labels)}
        for held in ("val", "test"):
            if (path / held).is_dir():
                parts[held] = _class_folder(path / held, classes)[1:]
    else:
        classes, files, labels = _class_folder(path)
        parts = {"train": (files, labels)}
    size = (size, size)
    total = sum(len(f) for f, _ in parts.values()) * channels * size[0] * size[1]
    budget = (max_memory * 1e9) if max_memory else memory_budget()
    streaming = stream if stream is not None else total > budget
    notes = []
    if streaming and stream is None:
        notes.append(f"streaming the images from disk: decoded they would take "
                     f"{total / 1e9:.1f} GB, over the {budget / 1e9:.1f} GB memory budget "
                     "(--max-memory)")
    train_files, train_labels = parts["train"]
    if streaming:
        keep = _report_unreadable([_check_readable(f) for f in train_files], strict, path)
        train = StreamSplit([train_files[i] for i in keep], _take(train_labels, keep), size,
                            channels)
    else:
        train = _decode_all(train_files, train_labels, size, strict, path, channels)
    # Held-out splits are held in memory: they are evaluated and drawn on.
    held = {k: _decode_all(*parts[k], size, strict, path / k, channels) for k in ("val", "test")
            if k in parts}
    src = str(path.resolve())
    if val_fraction is None and held:
        val_name = "val" if "val" in held else "test"
        return Dataset(path.stem, src, classes, train, held[val_name], val_name, notes,
                       test=held.get("test") if val_name == "val" else None)
    return hold_out(Dataset(path.stem, src, classes, train, train, "train", notes,
                            test=held.get("test")), val_fraction or DEFAULT_VAL_FRACTION, seed)


# --- local CIFAR copies ---------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they hold (dicts, lists, numpy arrays),
    so a hostile file cannot run code while being read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # protocol-2 pickles store bytes via _codecs.encode

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CnnkitError(f"{path} is not a readable CIFAR batch: {e}") from None


def _cifar_split(batches: list[dict], label_key: str) -> Split:
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels))


def _local_cifar10(path: Path):
    meta = _read_batch(path / "batches.meta")
    files = sorted(path.glob("data_batch_*"))
    train = _cifar_split([_read_batch(f) for f in files], "labels")
    test_file = path / "test_batch"
    test = _cifar_split([_read_batch(test_file)], "labels") if test_file.exists() else None
    return list(meta["label_names"]), train, test


def _local_cifar100(path: Path):
    meta = _read_batch(path / "meta")
    train = _cifar_split([_read_batch(path / "train")], "fine_labels")
    test = _cifar_split([_read_batch(path / "test")], "fine_labels") \
        if (path / "test").is_file() else None
    return list(meta["fine_label_names"]), train, test


def _find_cifar_folder(path: Path) -> Path | None:
    for name in ("cifar-10-batches-py", "cifar-100-python"):
        if (path / name).is_dir():
            return path / name
    return None


# --- downloads --------------------------------------------------------------------------

def _download(name: str, root: Path):
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
           "mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        train = cls(str(root), train=True, download=True)
        test = cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as e:  # URLError and socket errors are OSErrors
        raise DownloadError(f"could not download {name} into {root} ({first_line(e)}); with no "
                            f"network, --data PATH takes a local copy") from None

    def split(ds) -> Split:
        data = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
        data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        return Split(data.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))

    return name, list(train.classes), split(train), split(test)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    return [str(c) for c in d.target_names], Split(images, torch.from_numpy(d.target)), None
