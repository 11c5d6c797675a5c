"""Robust image decoding: any PIL mode / EXIF orientation -> RGB as a viewer shows it; binary
masks; 16-bit depth maps; cheap up-front header checks; fast reduced-scale JPEG decoding."""

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gissl.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")

# C3VD stores depth as uint16 with 0..65535 = 0..100 mm (docs/ssl4gie-study.md §2.5). One constant for the
# resized training target and the original-resolution target (the reference mixed /65535 and
# /65536, docs/ssl4gie-study.md §8 item 14).
DEPTH_MM_PER_UNIT = 100.0 / 65535.0

_EXIF_ORIENTATION = 0x0112


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def _orientation(im, decode=True):
    """EXIF orientation of an open image (1 = as stored).

    A PNG may keep its eXIf chunk after the pixel data, and PIL's ``getexif`` then decodes the
    whole image to reach it: that decode runs here, outside the try, so a broken data stream is
    reported instead of being taken for a broken EXIF block (PIL would then hand out a partly
    decoded image without a word). ``decode=False`` (cheap header checks) uses only an eXIf
    chunk found before the data.
    """
    if im.format == "PNG" and "exif" not in im.info:
        if not decode:
            return 1
        im.load()
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1


def _to_rgb(im):
    """Any PIL mode -> RGB. Transparent pixels become black (endoscopy frames have black borders);
    16-bit and 32-bit integer images are scaled from their full range to 8 bit."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        out = Image.new("RGB", im.size, (0, 0, 0))
        out.paste(im, mask=im.getchannel("A"))
        return out
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float32)
        a = a / 257.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else a
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im)
        a = a * 255.0 if np.nanmax(a, initial=0) <= 1.0 else a
        return Image.fromarray(np.clip(np.nan_to_num(a) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_rgb(path, size=None):
    """Decode ``path`` to an RGB PIL image in display orientation (EXIF applied).

    size: optional (W, H) the caller will resize to; a JPEG is then decoded directly at the
    smallest DCT scale (1/2, 1/4, 1/8) that is still at least that large (``Image.draft``),
    which is several times faster than a full decode for 1280x1072 frames and 224-px targets.
    """
    try:
        with Image.open(path) as im:
            orientation = _orientation(im)
            if size is not None and im.format == "JPEG":
                w, h = size if orientation < 5 else (size[1], size[0])  # 5-8 swap the axes
                im.draft(None, (int(w), int(h)))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        # the up-front checks (check_image, what --skip-bad-files skips) passed this file, so
        # only replacing or removing it helps
        raise DataError(f"cannot decode image {path}: {e}; the file is damaged inside: replace or "
                        f"remove it") from None


def _open_oriented(path, size=None, mode=None):
    with Image.open(path) as im:
        orientation = _orientation(im)
        if im.format == "JPEG" and (size is not None or mode is not None):
            im.draft(mode, None if size is None else size if orientation < 5 else (size[1], size[0]))
        im.load()
        return ImageOps.exif_transpose(im) if orientation != 1 else im


def load_mask(path, size=None, resize=False):
    """Binary mask as a (H, W) bool array in display orientation.

    Grey/RGB masks (Kvasir-SEG's are RGB JPEGs with soft edges) are binarised at 0.5 of the full
    range (luma >= 128; 16-bit: >= 32768). A mask whose largest value is 1 is an index mask
    (0/1) and its 1s are foreground. ``size`` (W, H): a JPEG mask may be decoded at reduced
    scale (still >= size), for callers that resize it anyway; ``resize=True`` resizes the grey
    levels to ``size`` (bilinear, area-like when shrinking) before thresholding, so soft edges
    land where the 0.5 level lies.
    """
    try:
        # JPEG masks: decode the luma channel only (what the threshold uses), optionally scaled
        im = _open_oriented(path, size, mode="L")
    except Exception as e:
        raise DataError(f"cannot decode mask {path}: {e}; replace or remove the file") from None
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    else:
        if im.mode in ("RGBA", "LA", "PA", "P"):
            im = _to_rgb(im)
        im = im.convert("L")
        if resize and size is not None and im.size != tuple(size):
            if im.getextrema()[1] == 1:  # index mask: scale 0/1 to 0/255 before interpolating
                im = im.point(lambda v: 255 if v else 0)
            im = im.resize(tuple(size), Image.BILINEAR)
        a = np.asarray(im)
        top = 255.0
    if resize and size is not None and a.shape != (size[1], size[0]):  # 16-bit / float masks
        a = np.asarray(Image.fromarray((a >= top / 2).astype(np.uint8) * 255).resize(tuple(size), Image.BILINEAR))
        top = 255.0
    if a.max(initial=0) == 1:
        return a >= 1
    return a >= top / 2


def load_depth(path):
    """C3VD depth TIFF -> (H, W) float32 millimetres (0 = invalid). Must be 16-bit."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read depth map {path}: {e}; replace or remove the file") from None
    if not (mode.startswith("I;16") or mode == "I") or a.ndim != 2:
        raise DataError(f"depth map {path} has PIL mode {mode!r}; C3VD depth must be a single-channel "
                        f"16-bit TIFF (0..65535 = 0..100 mm)")
    return a.astype(np.float32) * np.float32(DEPTH_MM_PER_UNIT)


def _tail_has(path, marker, tail=1024):
    # A JPEG or PNG cut short loses its end marker (JPEG FFD9, PNG IEND chunk); decoders then fill
    # grey silently (PIL with LOAD_TRUNCATED_IMAGES) or fail late inside a worker. Writers may
    # append padding after the marker, so look at the tail rather than the last bytes only.
    # Reading 1 KB per file keeps the up-front check cheap even for C3VD's ~10k large PNGs.
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - tail))
        return marker in f.read()


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"BM", "BMP"), (b"RIFF", "WebP"), (b"GIF8", "GIF"))


def _looks_like(path):
    """The image format whose signature ``path`` starts with, or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def check_image(path):
    """Cheap validity check without a full decode. Returns the display size ``(W, H)``.

    Reads the header and the last kilobyte, checks that the data the header points to is
    present (JPEG end marker, PNG IEND chunk, TIFF strip extents) and raises DataError naming
    the file. PNGs also get their chunk checksums verified (a read of the file, no decode: about
    1 ms for a 1350x1080 C3VD frame, 15x less than decoding it), which finds damage anywhere in
    the file. Damage inside JPEG or TIFF data is found only if the decoder notices it, when the
    image is decoded (DataError then, naming the file).
    """
    try:
        size_on_disk = os.path.getsize(path)
        if size_on_disk == 0:
            raise OSError("empty file (0 bytes)")
        # (no warnings.catch_warnings here to silence PIL's "Corrupt EXIF" warnings: it is not
        # thread-safe and the readers run this in a thread pool)
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            swap = _orientation(im, decode=False) >= 5
            ends = [t[2] for t in im.tile]
            if fmt == "TIFF":
                offsets = im.tag_v2.get(273) or im.tag_v2.get(324) or ()
                counts = im.tag_v2.get(279) or im.tag_v2.get(325) or ()
                ends = [o + c for o, c in zip(offsets, counts)]
        if any(e > size_on_disk for e in ends):
            raise OSError("file is truncated (image data extends past the end of the file)")
        if fmt == "JPEG" and not _tail_has(path, b"\xff\xd9"):
            raise OSError("file is truncated (no JPEG end-of-image marker)")
        if fmt == "PNG" and not _tail_has(path, b"IEND"):
            raise OSError("file is truncated (no PNG IEND chunk)")
        if fmt == "PNG":
            with Image.open(path) as im:
                im.verify()  # chunk CRCs: a damaged data stream otherwise decodes partly, silently
    except Exception as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"file not found: {path}") from None
        if isinstance(e, UnidentifiedImageError) and (fmt := _looks_like(path)):
            # e.g. a TIFF cut short before its directory (written last): PIL only says "cannot identify"
            e = f"file is truncated or damaged: it starts as a {fmt} but PIL cannot read it"
        raise DataError(f"{path}: not a readable image ({e})") from None
    if w < 1 or h < 1:
        raise DataError(f"{path}: image has zero size")
    return (h, w) if swap else (w, h)


def report_bad(bad, skip_bad, what="dataset"):
    """``bad``: list of ``"path: problem"`` strings. Raise one DataError listing them, or warn
    once and return when ``skip_bad``."""
    if not bad:
        return
    shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    if skip_bad:
        warnings.warn(f"skipping {len(bad)} bad file(s) in {what}:\n  {shown}", stacklevel=3)
        return
    raise DataError(f"{len(bad)} bad file(s) in {what}:\n  {shown}\n"
                    f"fix or remove them, or pass --skip-bad-files to skip them")
