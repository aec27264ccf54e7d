"""RedisStore: the StateStore contract on Redis.

Keys (the `{namespace}` hash tag keeps one engine group's keys in one cluster slot)::

    streamer:{ns}:layout                 the row layout (JSON) the states were written with
    streamer:{ns}:meta                   hash: weights_version, step of the last checkpoint
    streamer:{ns}:extra                  engine-wide state of the checkpoint (learner window)
    streamer:{ns}:latest                 hash: entity -> latest forecast message
    streamer:{ns}:weights                hash: version -> weights + optimizer (format.py)
    streamer:{ns}:quality                prequential scores (JSON), refreshed at checkpoints
    streamer:{ns}:p:<topic>:<n>:owner    fencing token of partition n (INCR on acquire)
    streamer:{ns}:p:<topic>:<n>:pos      next offset to read in partition n
    streamer:{ns}:p:<topic>:<n>:step     last closed step at that position
    streamer:{ns}:p:<topic>:<n>:rows     hash: entity -> state blob (see format.py)

`commit` runs one Lua script: it checks every partition's owner token first and writes
nothing if any differs (FencedError), then writes positions, steps, rows and metadata.
Redis runs a script atomically, so a checkpoint is visible whole or not at all. redis-py
errors are translated into StateError here, at the boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis

from ..errors import FencedError, StateError
from .format import RowLayout
from .store import Checkpoint, EntityState, LoadedState, rows_and_steps, to_entities

_CHUNK = 500  # field/value pairs per HSET inside the script (Lua's unpack has a stack limit)

_COMMIT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local cur = redis.call('GET', KEYS[(i - 1) * 4 + 1])
  if cur ~= ARGV[4 + i] then
    return {'fenced', tostring(i), cur or '0'}
  end
end
local a = 5 + n
for i = 1, n do
  local base = (i - 1) * 4
  local pos = ARGV[a]
  local nset = tonumber(ARGV[a + 1])
  local ndel = tonumber(ARGV[a + 2])
  a = a + 3
  if pos ~= '' then
    redis.call('SET', KEYS[base + 2], pos)
    if ARGV[4] ~= '' then redis.call('SET', KEYS[base + 3], ARGV[4]) end
  end
  local done = 0
  while done < nset do
    local k = math.min(CHUNK, nset - done)
    redis.call('HSET', KEYS[base + 4], unpack(ARGV, a, a + 2 * k - 1))
    a = a + 2 * k
    done = done + k
  end
  if ndel > 0 then
    redis.call('HDEL', KEYS[base + 4], unpack(ARGV, a, a + ndel - 1))
    a = a + ndel
  end
end
redis.call('SET', KEYS[4 * n + 1], ARGV[2])
redis.call('HSET', KEYS[4 * n + 2], 'weights_version', ARGV[3], 'step', ARGV[4])
if ARGV[a] == '1' then redis.call('SET', KEYS[4 * n + 3], ARGV[a + 1]) end
return {'ok'}
""".replace("CHUNK", str(_CHUNK))


class RedisStore:
    def __init__(self, url: str, namespace: str, *, timeout_s: float = 10.0) -> None:
        self._ns = f"streamer:{{{namespace}}}"
        try:
            self._r: Any = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            self._commit_script = self._r.register_script(_COMMIT)
        except (redis.RedisError, ValueError) as exc:
            raise StateError(f"redis {_safe_url(url)}: {exc}") from exc
        self._url = _safe_url(url)

    def ping(self) -> None:
        self._call(self._r.ping)

    def _key(self, topic: str, partition: int, what: str) -> str:
        return f"{self._ns}:p:{topic}:{partition}:{what}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StateError(f"redis {self._url}: {type(exc).__name__}: {exc}") from exc

    def acquire(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(partitions)
        pipe = self._r.pipeline(transaction=True)
        for p in parts:
            pipe.incr(self._key(topic, p, "owner"))
        tokens = self._call(pipe.execute)
        return {p: int(t) for p, t in zip(parts, tokens, strict=True)}

    def load(self, topic: str, partitions: Iterable[int], layout: RowLayout) -> LoadedState:
        parts = sorted(partitions)
        pipe = self._r.pipeline(transaction=True)
        pipe.get(f"{self._ns}:layout")
        pipe.hget(f"{self._ns}:meta", "weights_version")
        pipe.get(f"{self._ns}:extra")
        for p in parts:
            pipe.get(self._key(topic, p, "pos"))
            pipe.get(self._key(topic, p, "step"))
            pipe.hgetall(self._key(topic, p, "rows"))
        replies = self._call(pipe.execute)
        stored_layout, weights_version, extra = replies[0], replies[1], replies[2]
        replies = replies[1:]  # keep the per-partition indexing below
        out = LoadedState(
            weights_version=_int_or_none(weights_version, "weights_version"),
            extra=bytes(extra) if extra is not None else None,
        )
        any_rows = any(replies[4 + 3 * i] for i in range(len(parts)))
        if any_rows and stored_layout is not None and stored_layout.decode() != layout.to_json():
            raise StateError(
                "stored states were written with another model layout "
                f"({stored_layout.decode()[:200]}); use another namespace or clear it"
            )
        for i, p in enumerate(parts):
            pos, step, rows = replies[2 + 3 * i : 5 + 3 * i]
            if pos is not None:
                out.positions[p] = _int_or_none(pos, f"partition {p} position") or 0
            if step is not None:
                out.steps[p] = _int_or_none(step, f"partition {p} step") or 0
            if rows:
                try:
                    names = [k.decode("utf-8") for k in rows]
                except UnicodeDecodeError:
                    raise StateError(f"partition {p}: an entity key is not UTF-8") from None
                out.entities += to_entities(p, names, list(rows.values()), layout)
        return out

    def commit(self, checkpoint: Checkpoint, tokens: Mapping[int, int], layout: RowLayout) -> int:
        blobs = rows_and_steps(checkpoint.entities, layout)
        parts = sorted(
            set(checkpoint.positions)
            | {e.partition for e in checkpoint.entities}
            | {p for p, _ in checkpoint.removed}
        )
        sets: dict[int, list[Any]] = {p: [] for p in parts}
        for e, blob in zip(checkpoint.entities, blobs, strict=True):
            sets[e.partition] += [e.entity, blob]
        dels: dict[int, list[str]] = {p: [] for p in parts}
        for p, name in checkpoint.removed:
            dels[p].append(name)
        keys: list[str] = []
        for p in parts:
            keys += [self._key(checkpoint.topic, p, w) for w in ("owner", "pos", "step", "rows")]
        keys += [f"{self._ns}:layout", f"{self._ns}:meta", f"{self._ns}:extra"]
        step = "" if checkpoint.step is None else str(checkpoint.step)
        args: list[Any] = [len(parts), layout.to_json(), checkpoint.weights_version, step]
        args += [str(tokens.get(p, -1)) for p in parts]
        for p in parts:
            pos = checkpoint.positions.get(p)
            args += ["" if pos is None else str(pos), len(sets[p]) // 2, len(dels[p])]
            args += sets[p] + dels[p]
        args += ["1", checkpoint.extra] if checkpoint.extra is not None else ["0", ""]
        reply = self._call(self._commit_script, keys=keys, args=args)
        if reply[0] == b"fenced":
            p = parts[int(reply[1]) - 1]
            raise FencedError(checkpoint.topic, p, tokens.get(p, -1), int(reply[2]))
        return sum(map(len, blobs))

    def load_entity(
        self, topic: str, partition: int, entity: str, layout: RowLayout
    ) -> EntityState | None:
        blob = self._call(self._r.hget, self._key(topic, partition, "rows"), entity)
        return None if blob is None else to_entities(partition, [entity], [blob], layout)[0]

    def put_weights(self, version: int, blob: bytes, keep: int) -> None:
        key = f"{self._ns}:weights"
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, str(version), blob)
        pipe.hkeys(key)
        _, versions = self._call(pipe.execute)
        stale = sorted(int(v) for v in versions)[:-keep]
        if stale:
            self._call(self._r.hdel, key, *[str(v) for v in stale])

    def get_weights(self, version: int) -> bytes | None:
        value = self._call(self._r.hget, f"{self._ns}:weights", str(version))
        return bytes(value) if value is not None else None

    def put_latest(self, forecasts: Mapping[str, bytes]) -> None:
        if forecasts:
            self._call(self._r.hset, f"{self._ns}:latest", mapping=dict(forecasts))

    def get_latest(self, entity: str) -> bytes | None:
        value = self._call(self._r.hget, f"{self._ns}:latest", entity)
        return bytes(value) if value is not None else None

    def put_quality(self, report: bytes) -> None:
        self._call(self._r.set, f"{self._ns}:quality", report)

    def get_quality(self) -> bytes | None:
        value = self._call(self._r.get, f"{self._ns}:quality")
        return bytes(value) if value is not None else None

    def close(self) -> None:
        self._r.close()


def _int_or_none(raw: bytes | None, what: str) -> int | None:
    if raw is None or raw == b"":
        return None
    try:
        return int(raw)
    except ValueError:
        raise StateError(f"stored {what} is not an integer: {raw[:40]!r}") from None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
