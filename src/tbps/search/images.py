"""Reading image files for search safely: bounded decoding and confinement to the image roots.

* :func:`decode_image` refuses an image whose header declares more than ``max_pixels`` pixels
  *before* decoding it. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is process-global and
  only warns up to twice its 89 Mpx default: a 21 KB PNG of 13,000 x 13,000 one-bit pixels
  decodes to 507 MB of RGB (3.4 s, 821 MB peak RSS measured), an RGB one to 2.5 GB.
* :func:`open_inside_roots` opens a stored path only if, *at the time of the request*, it is a
  regular file whose real location lies inside one of the index's image roots: a file swapped
  for a symbolic link to ``/etc/shadow`` after indexing, a FIFO or a device is refused. The check
  is made on the opened descriptor (``/proc/self/fd`` on Linux, else a realpath + inode
  comparison), so the file cannot be swapped between the check and the read.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from tbps.data.records import ImageLoadError

# 40 Mpx: above any camera crop or phone photo people search in (a 48 Mpx phone sensor bins to
# 12 Mpx by default), while one decode stays at about 120 MB of RGB.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLargeError(ImageLoadError):
    """An image whose declared size exceeds the pixel limit (never decoded)."""


class ImageAccessError(PermissionError):
    """A stored image path that is not (or no longer) a regular file inside the image roots."""


# "<_io.BytesIO object at 0x7f...>", "<PIL.PngImagePlugin.PngImageFile ... at 0x...>": Pillow puts
# the file object's repr into some messages; a reason shown to a user never carries one.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _readable_reason(error: BaseException, label: object) -> str:
    """The message of a decoding error with any object repr replaced by the image's label."""
    text = str(error) or type(error).__name__
    return _OBJECT_REPR.sub(lambda _: str(label), text)


def check_max_pixels(max_pixels: int) -> int:
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return max_pixels


def decode_image(
    source: str | os.PathLike | BinaryIO | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | os.PathLike | None = None,
    semaphore: threading.Semaphore | None = None,
    exif_transpose: bool = False,
) -> Image.Image:
    """Decode an image to RGB; :class:`ImageTooLargeError` above ``max_pixels`` (checked on the
    header, before any pixel is decoded), :class:`~tbps.data.records.ImageLoadError` for
    anything unreadable. ``semaphore`` bounds how many decodes run at once (it is held only
    around the decode itself)."""
    label = name if name is not None else (source if isinstance(source, (str, os.PathLike)) else "<upload>")
    check_max_pixels(max_pixels)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            # ``open`` has read the header only: refuse oversized images before ``load``.
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    label,
                    f"image is {width} x {height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (max_pixels); not decoded",
                )
            if semaphore is not None:
                semaphore.acquire()
            try:
                image.load()
                if exif_transpose:
                    from PIL import ImageOps

                    image = ImageOps.exif_transpose(image)
                return image.convert("RGB")
            finally:
                if semaphore is not None:
                    semaphore.release()
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(label, "is a directory") from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not an image format Pillow can read (or a damaged header)") from None
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(label, f"image too large ({_readable_reason(error, label)})") from None
    except (OSError, SyntaxError, ValueError) as error:
        # PIL signals unidentified / corrupt / truncated data with OSError subclasses, and some
        # plugins raise SyntaxError or ValueError on malformed headers.
        raise ImageLoadError(label, _readable_reason(error, label)) from error


# --------------------------------------------------------------------------- confinement
def real_roots(roots: Iterable[str | os.PathLike]) -> tuple[Path, ...]:
    """Resolved, de-duplicated image roots (each must be an absolute path)."""
    out: list[Path] = []
    for root in roots:
        path = Path(os.path.realpath(os.fspath(root)))
        if path not in out:
            out.append(path)
    return tuple(out)


def is_inside(path: str | os.PathLike, roots: Sequence[Path]) -> bool:
    """Whether the (already resolved) ``path`` lies inside one of ``roots``."""
    candidate = Path(path)
    return any(candidate == root or candidate.is_relative_to(root) for root in roots)


def _opened_location(fd: int, path: str) -> str:
    """The real path of the file behind descriptor ``fd`` (opened from ``path``)."""
    link = f"/proc/self/fd/{fd}"
    if os.path.islink(link):
        return os.readlink(link)
    # No /proc: resolve the name and make sure it still names the very file we opened.
    resolved = os.path.realpath(path)
    opened, named = os.fstat(fd), os.stat(resolved)
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise ImageAccessError(f"{path} changed while it was being opened")
    return resolved


def open_inside_roots(path: str | os.PathLike, roots: Sequence[Path]) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file whose real location is inside ``roots``.

    Raises :class:`ImageAccessError` (a regular file elsewhere, a FIFO, a device, a directory)
    or :class:`FileNotFoundError`. The caller closes the returned file.
    """
    if not roots:
        raise ImageAccessError("no image roots are known for this index, so no image file is served")
    name = os.fspath(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(name, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageAccessError(f"{name} is not a regular file")
        location = _opened_location(fd, name)
        if not is_inside(location, roots):
            raise ImageAccessError(f"{name} resolves to a file outside the index's image roots")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def iter_file(handle: BinaryIO, chunk_size: int = 256 * 1024) -> Iterable[bytes]:
    """The bytes of an open file in chunks, closing it at the end (for streaming responses)."""
    try:
        while chunk := handle.read(chunk_size):
            yield chunk
    finally:
        handle.close()
