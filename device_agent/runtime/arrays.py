"""The one reader of ``.npy`` and ``.npz`` input bytes, bounded before anything is allocated.

``np.load`` trusts what a file declares: an ``.npy`` header's shape decides the allocation, and
an ``.npz`` member is inflated (bzip2 and lzma without any output bound) before a single limit
is checked, so a 2 KB request can cost gigabytes. :func:`load_arrays` is used instead by the
local API and by ``edgeward-agent predict``:

- ``.npy``: numpy's own header parser (:mod:`numpy.lib.format`, headers of at most 10,000
  characters), then a numeric dtype (bool, integer, float: no object, string, structured or
  pickled data), a shape whose bytes fit ``max_input_bytes`` and exactly match the bytes present,
  all before the array is made.
- ``.npz``: at most ``max_input_arrays`` members, each a plain ``NAME.npy`` (no folders, no
  duplicates, no encryption), stored or deflated (what ``np.savez`` and ``np.savez_compressed``
  write); every other compression is refused unopened. Each member's declared size must fit what
  is left of ``max_input_bytes``, and it is read in chunks that stop as soon as the bytes produced
  go past it: a declared size can lie, the bytes produced cannot.

Every refusal is a :class:`~device_agent.errors.FormatError` (HTTP 422, exit 3).
"""

from __future__ import annotations

import io
import re
import struct
import tokenize
import zipfile
import zlib
from typing import IO

import numpy as np
from numpy.lib import format as npformat

from device_agent.config import DEFAULT_LIMITS, BundleLimits
from device_agent.errors import FormatError

NPY_MAGIC = b"\x93NUMPY"  # numpy.lib.format.MAGIC_PREFIX
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip
CENTRAL_DIR_SIGNATURE = b"PK\x01\x02"  # starts every central directory entry
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what JSON inputs allow too
NPZ_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}\.npy")
READ_CHUNK = 64 * 1024  # the step of a bounded member read; the bound itself is max_input_bytes

# What a hostile zip or npy can make the standard library raise while it is parsed.
_PARSE_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    SyntaxError,  # numpy re-tokenizes a header it cannot parse as written by Python 2
    tokenize.TokenError,
)


def load_arrays(
    data: bytes | bytearray, limits: BundleLimits = DEFAULT_LIMITS
) -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npy`` as one array or an ``.npz`` as ``{name: array}``, told apart by their magic;
    anything else, or anything over ``limits.max_input_bytes``, is a :class:`FormatError`."""
    head = bytes(data[:6])
    try:
        if head.startswith(NPY_MAGIC):
            return read_npy(data, limits.max_input_bytes)
        if head[:4] in ZIP_MAGICS:
            return read_npz(data, limits)
    except FormatError:
        raise
    except _PARSE_ERRORS as e:
        raise FormatError(f"{type(e).__name__}: {e}") from e
    raise FormatError("neither an .npy (\\x93NUMPY) nor an .npz (zip) file")


def read_npy(data: bytes | bytearray, max_bytes: int) -> np.ndarray:
    """One ``.npy`` array, its header checked against ``max_bytes`` and the bytes present."""
    fp = io.BytesIO(data)
    version = npformat.read_magic(fp)
    if version not in ((1, 0), (2, 0)):
        raise FormatError(f".npy format version {version[0]}.{version[1]} is not accepted (1.0 and 2.0 are)")
    try:
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = read_header(fp)
    except TypeError as e:  # numpy sorts the header's keys: a non-string key raises TypeError
        raise FormatError(f"the .npy header is not a dictionary of its three string keys: {e}") from e
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.shape:
        raise FormatError(f"arrays must hold numbers (bool, int, float), not {dtype} (pickles are refused)")
    if any(d < 0 for d in shape):
        raise FormatError(f"the .npy header declares a negative dimension in {shape[:8]}")
    count = 1
    for d in shape:
        count *= d  # Python integers: a product of 2**40 does not wrap
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise FormatError(f"the .npy header declares {nbytes} bytes of data, the limit is {max_bytes}")
    offset = fp.tell()
    present = len(data) - offset
    if present != nbytes:
        raise FormatError(f"the .npy header declares {nbytes} bytes of data, {present} follow it")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
    # bytes give a read-only view: copy, as np.load returns an array of its own (at most max_bytes)
    return array if isinstance(data, bytearray) else array.copy()


def read_npz(data: bytes | bytearray, limits: BundleLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """The members of an ``.npz`` as ``{name without .npy: array}``, every byte bounded."""
    most = limits.max_input_arrays
    # Every central directory entry starts with this signature: counting it bounds the entries
    # before zipfile builds an object for each (a 64 MiB file could declare a million).
    if data.count(CENTRAL_DIR_SIGNATURE) > most:
        raise FormatError(f"the .npz holds more than {most} arrays")
    budget = limits.max_input_bytes
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        if not infos:
            raise FormatError("the .npz holds no arrays")
        if len(infos) > most:
            raise FormatError(f"the .npz holds {len(infos)} arrays, the limit is {most}")
        for info in infos:
            name = info.filename
            if not MEMBER_NAME.fullmatch(name) or name[:-4] in out:
                raise FormatError(f"the .npz member {name[:80]!r} is not a plain, unique NAME.npy")
            if info.flag_bits & 0x1:
                raise FormatError(f"the .npz member {name!r} is encrypted")
            if info.compress_type not in NPZ_METHODS:
                method = METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
                raise FormatError(
                    f"the .npz member {name!r} is compressed with {method}; only stored and deflate "
                    "(np.savez, np.savez_compressed) are accepted"
                )
            if info.file_size > budget:
                raise FormatError(
                    f"the .npz member {name!r} declares {info.file_size} bytes, "
                    f"{budget} of the {limits.max_input_bytes}-byte input limit are left"
                )
            with z.open(info) as member:
                raw = _read_capped(member, budget, name, limits.max_input_bytes)
            budget -= len(raw)
            out[name[:-4]] = read_npy(raw, len(raw))
    return out


def _read_capped(member: IO[bytes], budget: int, name: str, limit: int) -> bytearray:
    """A member's bytes, read a chunk at a time and refused as soon as they pass ``budget``."""
    raw = bytearray()
    while True:
        chunk = member.read(min(READ_CHUNK, budget - len(raw) + 1))
        if not chunk:
            return raw
        raw += chunk
        if len(raw) > budget:
            raise FormatError(
                f"the .npz member {name!r} expands past the {limit}-byte input limit"
            )
