"""Compact, pickle-free binary encoding of one ``Trajectory`` for the shared-memory ring.

Records travel between processes of one job, so the format favours speed and exact round-trips over
self-description: a fixed little-endian ``struct`` header with every scalar field of the trajectory,
then the token/log-prob arrays as raw bytes (``ShmRing.push_parts`` copies them straight into shared
memory). Pickle is avoided because it is slow for this shape of data and unsafe to decode. The
response text and the reference answer stay with the rollout (they go to its HDF5 log, not to the
trainer).

Layout::

    header  (struct _HEADER)
    prompt_tokens    int32[n_prompt]
    response_tokens  int32[n_resp]
    behav_logprobs   float32[n_resp]
    versions         int32[n_resp]
"""

from __future__ import annotations

import struct

import numpy as np

from areal_hpc.trajectory import FATES, Trajectory

_MAGIC = 0x4A525441  # b"ATRJ" little-endian
# 4: worker; 3: reward_seconds and reward_timed_out; 2: the fields of Trajectory, fixed (1 carried free-form
# extra fields)
_VERSION = 4

# magic, version, fate (index in FATES, 255: unknown), answer_ok, reward_timed_out, sample_id, prompt_id,
# group_id, rank, worker, reward, reward_seconds, t_start, t_end, interruptions, producer_full_waits, n_prompt, n_resp
_HEADER = struct.Struct("<IHBBBqqqqiddddIIII")
_NO_FATE = 255

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")


def _int_array(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == _I32:
        return np.ascontiguousarray(arr)
    out = np.ascontiguousarray(arr, dtype=_I32)
    if arr.size and not np.array_equal(out, arr):
        raise ValueError(f"trajectory field {name!r} has values outside int32 range")
    return out


def encode_parts(t: Trajectory, producer_full_waits: int = 0) -> list[bytes | memoryview]:
    """The record as buffers whose concatenation is the record (no intermediate join).

    ``producer_full_waits``: how often the producer has found the ring full so far, so the trainer can
    report back-pressure per step without another channel.
    """
    arrays = [_int_array("prompt_tokens", t.prompt_tokens), _int_array("response_tokens", t.response_tokens),
              np.ascontiguousarray(t.behav_logprobs, dtype=_F32), _int_array("versions", t.versions)]
    try:
        header = _HEADER.pack(_MAGIC, _VERSION, _NO_FATE if t.fate is None else FATES.index(t.fate),
                              bool(t.answer_ok), bool(t.reward_timed_out), t.sample_id, t.prompt_id, t.group_id,
                              t.rank, t.worker, float(t.reward), float(t.reward_seconds), float(t.t_start),
                              float(t.t_end), t.interruptions, producer_full_waits,
                              t.n_prompt, t.n_response)
    except struct.error as e:
        raise ValueError(f"trajectory {t.sample_id}: a scalar field is out of range: {e}") from e
    return [header, *(memoryview(a).cast("B") for a in arrays if a.size)]


def encode(t: Trajectory, producer_full_waits: int = 0) -> bytes:
    return b"".join(encode_parts(t, producer_full_waits))


def decode(b: bytes | bytearray | memoryview, *, copy: bool = True) -> tuple[Trajectory, int]:
    """(trajectory, the producer's full-ring waits so far) of a record from ``encode``.

    With ``copy=False`` the arrays are read-only views of ``b`` (only safe while ``b`` is unchanged).
    """
    buf = memoryview(b).cast("B") if not isinstance(b, bytes) else memoryview(b)
    if len(buf) < _HEADER.size:
        raise ValueError(f"trajectory record too short: {len(buf)} bytes < header {_HEADER.size}")
    (magic, version, fate, answer_ok, timed_out, sample_id, prompt_id, group_id, rank, worker, reward, reward_seconds,
     t_start, t_end, interruptions, waits, n_prompt, n_resp) = _HEADER.unpack_from(buf)
    if magic != _MAGIC:
        raise ValueError(f"not an encoded trajectory (magic {magic:#x})")
    if version != _VERSION:
        raise ValueError(f"trajectory codec version {version} unsupported (expected {_VERSION})")
    need = _HEADER.size + 4 * (n_prompt + 3 * n_resp)
    if len(buf) != need:
        raise ValueError(f"trajectory record is {len(buf)} bytes, its header says {need}")
    arrays = []
    off = _HEADER.size
    for dtype, n in ((_I32, n_prompt), (_I32, n_resp), (_F32, n_resp), (_I32, n_resp)):
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off)
        arrays.append(arr.copy() if copy else arr)
        off += 4 * n
    if fate != _NO_FATE and fate >= len(FATES):
        raise ValueError(f"trajectory record corrupted: fate index {fate}")
    if answer_ok > 1 or timed_out > 1:
        raise ValueError(f"trajectory record corrupted: flags answer_ok={answer_ok} reward_timed_out={timed_out}")
    traj = Trajectory(sample_id=sample_id, group_id=group_id, prompt_tokens=arrays[0], response_tokens=arrays[1],
                      behav_logprobs=arrays[2], versions=arrays[3], reward=reward, prompt_id=prompt_id, rank=rank,
                      worker=worker, answer_ok=bool(answer_ok), t_start=t_start, t_end=t_end,
                      interruptions=interruptions,
                      fate=None if fate == _NO_FATE else FATES[fate], reward_seconds=reward_seconds,
                      reward_timed_out=bool(timed_out))
    return traj, waits
