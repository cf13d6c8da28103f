"""Zero-copy numpy views of decoded Pillow images, through the Arrow C data interface.

Pillow keeps an RGB image as 4 bytes a pixel (R, G, B, 255). ``np.asarray(image)`` packs them into a new 3-byte
array through Pillow's raw encoder, in chunks that are then joined: two passes over the pixels, costlier than
everything else the loader does to a small image after decoding it, where OpenCV packs a 4-byte view to 3 bytes at
the cost of a plain copy. Pillow (>= 11.2) exports its pixel memory without a copy
through ``Image.__arrow_c_array__``; numpy cannot import Arrow arrays, so this module reads the exported structs,
whose layout the Arrow C data interface fixes as a stable ABI
(https://arrow.apache.org/docs/format/CDataInterface.html), and wraps the pixel buffer.
"""

from __future__ import annotations

import ctypes

import numpy as np
from PIL import Image


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p), ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64), ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# An RGB image's export: a fixed-size list of 4 per pixel, over one uint8 child array.
_PIXEL_FORMAT, _BYTE_FORMAT = b"+w:4", b"C"


def rgbx_view(image: Image.Image) -> np.ndarray | None:
    """The pixels of a loaded RGB image as a read-only uint8 ``[height, width, 4]`` view of its own memory (the
    fourth byte is padding, 255), or None where Pillow cannot export them without a copy (an older Pillow, or an
    image too large for one block of its allocator: rows not contiguous). The view keeps the memory alive."""
    if image.mode != "RGB" or not hasattr(image, "__arrow_c_array__"):
        return None
    try:
        schema_capsule, array_capsule = image.__arrow_c_array__()
    except ValueError:  # e.g. "Image rows are not contiguous in memory"
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    width, height = image.size
    if (schema.format != _PIXEL_FORMAT or schema.n_children != 1 or schema.children[0].contents.format != _BYTE_FORMAT
            or array.length != width * height or array.offset != 0 or array.n_children != 1):
        return None  # not the layout this reads: take the copying path
    child = array.children[0].contents
    if child.n_buffers != 2 or child.offset != 0 or child.length != 4 * width * height:
        return None
    memory = (ctypes.c_uint8 * child.length).from_address(child.buffers[1])
    # The capsule's destructor releases the export (and with it Pillow's hold on the memory): it must outlive every
    # view, so the ctypes buffer numpy wraps holds it.
    memory.export = array_capsule
    pixels = np.frombuffer(memory, dtype=np.uint8).reshape(height, width, 4)
    pixels.flags.writeable = False
    return pixels
