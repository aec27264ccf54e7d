"""Binary formats of states, weights and buffers: round trips and refusals (no pickle)."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.codec import decode_event, encode_event, encode_forecast
from streamer.errors import EventError, Reason, StateError
from streamer.state.format import (
    HEADER_SIZE,
    NO_STEP,
    RowLayout,
    decode_rows,
    encode_rows,
    pack_arrays,
    unpack_arrays,
)

LAYOUT = RowLayout.from_shapes({"h0": (4,), "c0": (4,), "norm_mean": (2,)})


def test_rows_round_trip_bit_for_bit():
    rows = np.random.default_rng(0).normal(size=(5, LAYOUT.size)).astype(np.float32)
    steps = [1, 2, NO_STEP, 4, 2**40]
    blobs = encode_rows(LAYOUT, rows, steps, [0, 7, 3, 2**31, 1])
    assert all(len(b) == HEADER_SIZE + 4 * LAYOUT.size for b in blobs)
    back, back_steps, back_slots = decode_rows(LAYOUT, blobs)
    assert back.tobytes() == rows.tobytes()
    assert back_steps.tolist() == steps
    assert back_slots.tolist() == [0, 7, 3, 2**31, 1]
    assert decode_rows(LAYOUT, encode_rows(LAYOUT, rows[:1], [1]))[2].tolist() == [-1]


def test_layout_flatten_unflatten_and_json():
    rows = {"h0": np.ones((2, 4)), "c0": np.zeros((2, 4)), "norm_mean": np.full((2, 2), 3.0)}
    flat = LAYOUT.flatten(rows)
    assert flat.shape == (2, 10)
    assert all(np.array_equal(LAYOUT.unflatten(flat)[k], v) for k, v in rows.items())
    assert RowLayout.from_json(LAYOUT.to_json()) == LAYOUT
    assert LAYOUT.flatten({k: v[:0] for k, v in rows.items()}).shape == (0, 10)
    with pytest.raises(StateError):
        RowLayout.from_json('{"version": 99, "fields": []}')
    with pytest.raises(StateError):
        RowLayout.from_json("not json")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:-1], "bytes"),
        (lambda b: b"NOPE" + b[4:], "magic"),
        (lambda b: b[:4] + (7).to_bytes(2, "little") + b[6:], "version"),
        (lambda b: b[:8] + b"\x00\x00\x00\x00" + b[12:], "layout"),
        (lambda b: b[:-4] + np.float32(np.inf).tobytes(), "non-finite"),
    ],
)
def test_bad_row_blobs_are_refused(mutate, match):
    blob = encode_rows(LAYOUT, np.zeros((1, LAYOUT.size), np.float32), [1])[0]
    with pytest.raises(StateError, match=match):
        decode_rows(LAYOUT, [mutate(blob)], ["AAPL"])


def test_arrays_round_trip_and_refusals():
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "steps": np.array([1, -2], np.int64),
        "mask": np.array([True, False]),
    }
    back = unpack_arrays(pack_arrays(arrays))
    assert np.array_equal(back["w"], arrays["w"]) and back["w"].dtype == np.float32
    assert np.array_equal(back["steps"], arrays["steps"])
    assert back["mask"].tolist() == [1, 0]
    blob = pack_arrays(arrays)
    for bad in (blob[:5], b"XXXX" + blob[4:], blob[:-3]):
        with pytest.raises(StateError):
            unpack_arrays(bad)
    with pytest.raises(StateError):
        pack_arrays({"s": np.array(["text"])})


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_event_encodings_round_trip(encoding):
    raw = encode_event("BRK.B", 1767225600.25, [187.5, -0.125], encoding)
    assert decode_event(raw, encoding, 1024) == {
        "entity": "BRK.B",
        "ts": 1767225600.25,
        "values": [187.5, -0.125],
    }


@pytest.mark.parametrize(
    "value, encoding, reason",
    [
        (None, "json", Reason.UNDECODABLE),
        (b"\xff\xfe", "json", Reason.UNDECODABLE),
        (b"{not json", "json", Reason.UNDECODABLE),
        (b"x" * 2000, "json", Reason.TOO_LARGE),
        (b"SE\x01\x05ABC", "binary", Reason.UNDECODABLE),
        (b"XX\x01\x01A" + b"\x00" * 10, "binary", Reason.UNDECODABLE),
    ],
)
def test_undecodable_messages(value, encoding, reason):
    with pytest.raises(EventError) as err:
        decode_event(value, encoding, 1024)
    assert err.value.reason is reason


def test_forecast_message_is_valid_json_even_with_nan():
    import json

    msg = json.loads(encode_forecast('a"b', 7, 1.5, [0.25, float("nan")], [1.0, 2.0], 3))
    assert msg == {
        "entity": 'a"b',
        "step": 7,
        "ts": 1.5,
        "forecast": [0.25, None],
        "level": [1.0, 2.0],
        "model_version": 3,
    }
