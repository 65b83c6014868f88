"""Find image/mask pairs in `ROOT/SPLIT/{images,masks}/` by shared file stem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segtrain.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MASK_SUFFIXES = {".png", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class Pair:
    """One training example on disk."""

    image: Path
    mask: Path

    @property
    def stem(self) -> str:
        return self.image.stem


def list_images(folder: Path, suffixes=IMAGE_SUFFIXES, what: str = "image") -> dict[str, Path]:
    """Files of `folder` by stem; hidden files are skipped, anything else that is not an image is refused."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found. Expected a data set laid out as ROOT/SPLIT/images and ROOT/SPLIT/masks.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in suffixes:
            raise DataError(
                f"{path}: not a supported {what} file (expected {', '.join(sorted(suffixes))}). "
                "Move it out of the data folder."
            )
        if path.stem in found:
            raise DataError(f"{path}: two files share the stem '{path.stem}' ({found[path.stem].name}); keep one.")
        found[path.stem] = path
    return found


def find_pairs(root: str | Path, split: str) -> list[Pair]:
    """All pairs of one split, sorted by stem; every image needs a mask and every mask an image."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found. Set data.root to a folder holding {split}/images and {split}/masks.")
    split_dir = root / split
    if not split_dir.is_dir():
        if (root / "images").is_dir() and (root / "masks").is_dir():  # given a split folder, not the data set's root
            raise DataError(f"{split_dir}: split folder not found. {root} holds images/ and masks/ itself: pass the "
                            f"data set's root, {root.parent}, which holds {split}/images and {split}/masks.")
        raise DataError(f"{split_dir}: split folder not found. Create it with images/ and masks/ inside, or choose "
                        "another split.")
    images = list_images(split_dir / "images")
    masks = list_images(split_dir / "masks", MASK_SUFFIXES, "mask")
    if not images:
        raise DataError(empty_folder_message(split_dir / "images", IMAGE_SUFFIXES) + (
            f" Each image pairs with the mask of the same file stem in {split_dir / 'masks'} (a.jpg with a.png; "
            f"masks: {suffix_list(MASK_SUFFIXES)})."))
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        raise DataError(
            f"{images[lonely_images[0]]}: no mask with the same stem in {split_dir / 'masks'}"
            f"{_more(lonely_images)}. Add the mask (e.g. {lonely_images[0]}.png) or remove the image."
        )
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        raise DataError(
            f"{masks[lonely_masks[0]]}: no image with the same stem in {split_dir / 'images'}"
            f"{_more(lonely_masks)}. Add the image or remove the mask."
        )
    return [Pair(images[stem], masks[stem]) for stem in sorted(images)]


def suffix_list(suffixes) -> str:
    return ", ".join(sorted(suffixes))


def empty_folder_message(folder: Path, suffixes=IMAGE_SUFFIXES) -> str:
    """"no images found" for `folder`: the extensions looked for, and that subfolders are not searched (naming a few
    when there are some)."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    text = (f"{folder}: no images found. Looked for {suffix_list(suffixes)} files (any case) directly in this "
            "folder; subfolders are not searched")
    if subfolders:
        shown = ", ".join(subfolders[:3]) + (", ..." if len(subfolders) > 3 else "")
        text += f" (it holds {len(subfolders)} subfolder{'s' if len(subfolders) > 1 else ''}: {shown}; move the images up)"
    return text + "."


def _more(stems: list[str]) -> str:
    return f" (and {len(stems) - 1} more)" if len(stems) > 1 else ""
