"""Compact, pickle-free binary encoding of one trajectory sample.

Records travel through ``ShmRing`` between processes of the same job, so the
format favours speed and exact round-trips over self-description: a fixed
little-endian ``struct`` header, the token/logprob arrays as raw bytes, then
optional extra scalar fields as (key, type, value) triples. Pickle is avoided
because it is slow for this shape of data and unsafe to decode.

Layout::

    header  (struct _HEADER, 76 bytes)
    prompt_tokens    int32[n_prompt]
    response_tokens  int32[n_resp]
    behav_logprobs   float32[n_resp]
    versions         int32[n_resp]
    extras           n_extra x (u16 key_len, key utf-8, u8 type, value)
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

_MAGIC = 0x4A525441  # b"ATRJ" little-endian
_VERSION = 1

# magic, version, n_extra, sample_id, prompt_id, group_id, rank,
# reward, t_start, t_end, answer_ok, pad x3, n_prompt, n_resp
_HEADER = struct.Struct("<IHHqqqqdddB3xII")

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")

INT_FIELDS = ("sample_id", "prompt_id", "group_id", "rank")
FLOAT_FIELDS = ("reward", "t_start", "t_end")
ARRAY_FIELDS = ("prompt_tokens", "response_tokens", "behav_logprobs", "versions")
CORE_FIELDS = frozenset((*INT_FIELDS, *FLOAT_FIELDS, *ARRAY_FIELDS, "answer_ok"))

_KEY = struct.Struct("<H")
_T_INT, _T_FLOAT, _T_BOOL, _T_STR, _T_NONE = b"i", b"f", b"b", b"s", b"n"
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")


def _int_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"sample field {name!r} must be 1-D, got shape {arr.shape}")
    if arr.dtype == _I32:
        return np.ascontiguousarray(arr)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(
            f"sample field {name!r} must hold integers, got dtype {arr.dtype}"
        )
    out = np.ascontiguousarray(arr, dtype=_I32)
    if arr.size and not np.array_equal(out, arr):
        raise ValueError(f"sample field {name!r} has values outside int32 range")
    return out


def _float_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"sample field {name!r} must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=_F32)


def _encode_extra(key: str, value: Any) -> bytes:
    kb = key.encode()
    if len(kb) > 0xFFFF:
        raise ValueError(f"extra sample field name too long: {key[:40]!r}...")
    head = _KEY.pack(len(kb)) + kb
    # bool before int: bool is an int subclass.
    if isinstance(value, bool | np.bool_):
        return head + _T_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int | np.integer):
        try:
            return head + _T_INT + _I64.pack(int(value))
        except struct.error as e:
            raise ValueError(
                f"extra sample field {key!r}={value} does not fit in int64"
            ) from e
    if isinstance(value, float | np.floating):
        return head + _T_FLOAT + _F64.pack(float(value))
    if isinstance(value, str):
        vb = value.encode()
        return head + _T_STR + _U32.pack(len(vb)) + vb
    if value is None:
        return head + _T_NONE
    raise TypeError(
        f"extra sample field {key!r} has unsupported type {type(value).__name__}; "
        "only int, float, bool, str and None scalars can be encoded"
    )


def encode_sample_parts(d: dict[str, Any]) -> list[bytes | memoryview]:
    """Encode ``d`` as a list of buffers whose concatenation is the record.

    Lets ``ShmRing.push_parts`` copy the arrays straight into shared memory
    instead of joining them into an intermediate ``bytes`` first.
    """
    missing = [
        k
        for k in (*INT_FIELDS, *FLOAT_FIELDS, *ARRAY_FIELDS, "answer_ok")
        if k not in d
    ]
    if missing:
        raise KeyError(f"sample is missing required field(s) {missing}")
    prompt = _int_array("prompt_tokens", d["prompt_tokens"])
    resp = _int_array("response_tokens", d["response_tokens"])
    logp = _float_array("behav_logprobs", d["behav_logprobs"])
    vers = _int_array("versions", d["versions"])
    if not len(resp) == len(logp) == len(vers):
        raise ValueError(
            "response_tokens, behav_logprobs and versions must have equal lengths, got "
            f"{len(resp)}, {len(logp)}, {len(vers)}"
        )
    extras = [_encode_extra(k, v) for k, v in d.items() if k not in CORE_FIELDS]
    if len(extras) > 0xFFFF:
        raise ValueError(f"too many extra sample fields ({len(extras)})")
    try:
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            len(extras),
            *(int(d[k]) for k in INT_FIELDS),
            *(float(d[k]) for k in FLOAT_FIELDS),
            bool(d["answer_ok"]),
            len(prompt),
            len(resp),
        )
    except struct.error as e:
        raise ValueError(f"sample scalar field out of range: {e}") from e
    parts: list[bytes | memoryview] = [header]
    parts.extend(memoryview(a).cast("B") for a in (prompt, resp, logp, vers) if a.size)
    parts.extend(extras)
    return parts


def encode_sample(d: dict[str, Any]) -> bytes:
    """Encode a trajectory sample dict to bytes (see module docstring for the layout)."""
    return b"".join(encode_sample_parts(d))


def decode_sample(
    b: bytes | bytearray | memoryview, *, copy: bool = True
) -> dict[str, Any]:
    """Decode a record from ``encode_sample`` into a dict with numpy arrays.

    With ``copy=False`` the arrays are read-only views of ``b`` (zero-copy; only
    safe while ``b`` is not modified or released).
    """
    buf = memoryview(b).cast("B") if not isinstance(b, bytes) else memoryview(b)
    if len(buf) < _HEADER.size:
        raise ValueError(
            f"sample record too short: {len(buf)} bytes < header {_HEADER.size}"
        )
    (magic, version, n_extra, *ints_floats, answer_ok, n_prompt, n_resp) = (
        _HEADER.unpack_from(buf)
    )
    if magic != _MAGIC:
        raise ValueError(f"not an encoded sample (magic {magic:#x})")
    if version != _VERSION:
        raise ValueError(
            f"sample codec version {version} unsupported (expected {_VERSION})"
        )
    out: dict[str, Any] = dict(
        zip((*INT_FIELDS, *FLOAT_FIELDS), ints_floats, strict=True)
    )
    out["answer_ok"] = bool(answer_ok)
    off = _HEADER.size
    need = off + 4 * (n_prompt + 3 * n_resp)
    if len(buf) < need:
        raise ValueError(f"sample record truncated: {len(buf)} bytes < {need}")
    for name, dtype, n in (
        ("prompt_tokens", _I32, n_prompt),
        ("response_tokens", _I32, n_resp),
        ("behav_logprobs", _F32, n_resp),
        ("versions", _I32, n_resp),
    ):
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off)
        out[name] = arr.copy() if copy else arr
        off += 4 * n
    for _ in range(n_extra):
        (klen,) = _KEY.unpack_from(buf, off)
        off += _KEY.size
        key = bytes(buf[off : off + klen]).decode()
        off += klen
        tag = bytes(buf[off : off + 1])
        off += 1
        if tag == _T_INT:
            (out[key],) = _I64.unpack_from(buf, off)
            off += _I64.size
        elif tag == _T_FLOAT:
            (out[key],) = _F64.unpack_from(buf, off)
            off += _F64.size
        elif tag == _T_BOOL:
            out[key] = buf[off] != 0
            off += 1
        elif tag == _T_STR:
            (slen,) = _U32.unpack_from(buf, off)
            off += _U32.size
            out[key] = bytes(buf[off : off + slen]).decode()
            off += slen
        elif tag == _T_NONE:
            out[key] = None
        else:
            raise ValueError(
                f"sample record corrupted: unknown extra type {tag!r} for field {key!r}"
            )
    if off != len(buf):
        raise ValueError(f"sample record has {len(buf) - off} trailing bytes")
    return out
