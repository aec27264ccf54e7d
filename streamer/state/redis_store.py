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
    streamer:{ns}:p:<topic>:<n>:rows     hash: entity -> state blob of resident entities
    streamer:{ns}:p:<topic>:<n>:cold     hash: entity -> state blob of evicted entities
    streamer:{ns}:p:<topic>:<n>:read     read mark: next offset read at the checkpoint
    streamer:{ns}:p:<topic>:<n>:seq      checkpoint sequence (INCR by every commit)
    streamer:{ns}:p:<topic>:<n>:wm       watermark before the position (float, repr)

`commit` runs one Lua script: it checks every partition's owner token and checkpoint
sequence first and writes nothing if a token differs (FencedError) or the store lost the
partition (owner token gone, sequence not the one expected: StoreLostError), then writes
positions, read marks, steps, rows and metadata.
Redis runs a script atomically, so a checkpoint is visible whole or not at all. redis-py
errors are translated into StateError here, at the boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from ..config import RedisConfig
from ..errors import FencedError, StateError, StoreLostError
from .format import RowLayout
from .redis_conn import redis_client, safe_url
from .store import (
    Checkpoint,
    EntityState,
    LoadedState,
    rows_and_steps,
    to_entities,
    to_entities_quarantined,
)

_CHUNK = 500  # field/value pairs per HSET inside the script (Lua's unpack has a stack limit)

_COMMIT = """
local n = tonumber(ARGV[1])
local K = 8
for i = 1, n do
  local b = (i - 1) * K
  local cur = redis.call('GET', KEYS[b + 1])
  if not cur then
    return {'lost', tostring(i), 'its owner token is gone'}
  end
  if cur ~= ARGV[4 + i] then
    return {'fenced', tostring(i), cur}
  end
  local want = ARGV[4 + n + i]
  if want ~= '' then
    local seq = redis.call('GET', KEYS[b + 6]) or '0'
    if seq ~= want then
      return {'lost', tostring(i), 'checkpoint ' .. want .. ' expected, ' .. seq .. ' found'}
    end
  end
end
local function names_of(first, count)
  local t = {}
  for j = 0, count - 1 do t[#t + 1] = ARGV[first + 2 * j] end
  return t
end
local function put(hash, other, first, count)
  local done = 0
  while done < count do
    local k = math.min(CHUNK, count - done)
    local at = first + 2 * done
    redis.call('HSET', hash, unpack(ARGV, at, at + 2 * k - 1))
    redis.call('HDEL', other, unpack(names_of(at, k)))
    done = done + k
  end
end
local a = 5 + 2 * n
for i = 1, n do
  local b = (i - 1) * K
  local pos, rd = ARGV[a + 1], ARGV[a + 2]
  local nset, ndel, nev = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  a = a + 6
  if pos ~= '' then
    redis.call('SET', KEYS[b + 2], pos)
    if ARGV[4] ~= '' then redis.call('SET', KEYS[b + 3], ARGV[4]) end
  end
  if rd ~= '' then redis.call('SET', KEYS[b + 5], rd) end
  if ARGV[a - 6] ~= '' then redis.call('SET', KEYS[b + 8], ARGV[a - 6]) end
  put(KEYS[b + 4], KEYS[b + 7], a, nset)
  a = a + 2 * nset
  local done = 0
  while done < ndel do
    local k = math.min(CHUNK, ndel - done)
    redis.call('HDEL', KEYS[b + 4], unpack(ARGV, a + done, a + done + k - 1))
    redis.call('HDEL', KEYS[b + 7], unpack(ARGV, a + done, a + done + k - 1))
    done = done + k
  end
  a = a + ndel
  put(KEYS[b + 7], KEYS[b + 4], a, nev)
  a = a + 2 * nev
  redis.call('INCR', KEYS[b + 6])
end
redis.call('SET', KEYS[K * n + 1], ARGV[2])
redis.call('HSET', KEYS[K * n + 2], 'weights_version', ARGV[3], 'step', ARGV[4])
if ARGV[a] == '1' then redis.call('SET', KEYS[K * n + 3], ARGV[a + 1]) end
return {'ok'}
""".replace("CHUNK", str(_CHUNK))


class RedisStore:
    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        timeout_s: float = 10.0,
        client: redis.Redis | None = None,
    ) -> None:
        """A store on `url` (credentials in the URL only), or on `client` when given (then
        `url` is only named in messages and `timeout_s` is the client's own)."""
        self._ns = f"streamer:{{{namespace}}}"
        self._url = _safe_url(url)
        try:
            if client is None:
                client = redis_client(RedisConfig(url=url, timeout_s=timeout_s))
            self._r: Any = client
            self._commit_script = self._r.register_script(_COMMIT)
        except (redis.RedisError, ValueError) as exc:
            raise StateError(f"redis {self._url}: {exc}") from exc

    @classmethod
    def from_config(cls, cfg: RedisConfig, namespace: str) -> RedisStore:
        """A store on the configured Redis: credentials, TLS and timeout from `cfg`."""
        return cls(cfg.url, namespace, timeout_s=cfg.timeout_s, client=redis_client(cfg))

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
        per = ("pos", "step", "read", "seq", "wm")
        for p in parts:
            for what in per:
                pipe.get(self._key(topic, p, what))
            pipe.hlen(self._key(topic, p, "cold"))
            pipe.hgetall(self._key(topic, p, "rows"))
        replies = self._call(pipe.execute)
        stored_layout, weights_version, extra = replies[0], replies[1], replies[2]
        width = len(per) + 2
        blocks = [replies[3 + width * i : 3 + width * (i + 1)] for i in range(len(parts))]
        out = LoadedState(
            weights_version=_int_or_none(weights_version, "weights_version"),
            extra=bytes(extra) if extra is not None else None,
        )
        any_rows = any(block[-1] for block in blocks)
        if any_rows and stored_layout is not None and stored_layout.decode() != layout.to_json():
            raise StateError(
                "stored states were written with another model layout "
                f"({stored_layout.decode()[:200]}); use another namespace or clear it"
            )
        for p, (pos, step, read, seq, wm, cold, rows) in zip(parts, blocks, strict=True):
            if pos is not None:
                out.positions[p] = _int_or_none(pos, f"partition {p} position") or 0
            if step is not None:
                out.steps[p] = _int_or_none(step, f"partition {p} step") or 0
            if read is not None:
                out.read_marks[p] = _int_or_none(read, f"partition {p} read mark") or 0
            out.seqs[p] = _int_or_none(seq, f"partition {p} checkpoint sequence") or 0
            if wm is not None:
                try:
                    out.watermarks[p] = float(wm)
                except ValueError:
                    raise StateError(f"stored partition {p} watermark is {wm[:40]!r}") from None
            out.cold[p] = int(cold)
            if rows:
                names, blobs = _names_and_blobs(p, rows, out.quarantined)
                good, bad = to_entities_quarantined(p, names, blobs, layout)
                out.entities += good
                out.quarantined += bad
        return out

    def sequences(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(partitions)
        pipe = self._r.pipeline(transaction=False)
        for p in parts:
            pipe.get(self._key(topic, p, "seq"))
        replies = self._call(pipe.execute)
        return {
            p: _int_or_none(r, f"partition {p} sequence") or 0
            for p, r in zip(parts, replies, strict=True)
        }

    def commit(self, checkpoint: Checkpoint, tokens: Mapping[int, int], layout: RowLayout) -> int:
        blobs = rows_and_steps(checkpoint.entities, layout)
        cold_blobs = rows_and_steps(checkpoint.evicted, layout)
        parts = checkpoint.partitions
        sets: dict[int, list[Any]] = {p: [] for p in parts}
        for e, blob in zip(checkpoint.entities, blobs, strict=True):
            sets[e.partition] += [e.entity, blob]
        colds: dict[int, list[Any]] = {p: [] for p in parts}
        for e, blob in zip(checkpoint.evicted, cold_blobs, strict=True):
            colds[e.partition] += [e.entity, blob]
        dels: dict[int, list[str]] = {p: [] for p in parts}
        for p, name in checkpoint.removed:
            dels[p].append(name)
        keys: list[str] = []
        for p in parts:
            keys += [
                self._key(checkpoint.topic, p, w)
                for w in ("owner", "pos", "step", "rows", "read", "seq", "cold", "wm")
            ]
        keys += [f"{self._ns}:layout", f"{self._ns}:meta", f"{self._ns}:extra"]
        step = "" if checkpoint.step is None else str(checkpoint.step)
        args: list[Any] = [len(parts), layout.to_json(), checkpoint.weights_version, step]
        args += [str(tokens.get(p, -1)) for p in parts]
        seqs = checkpoint.seqs
        args += ["" if seqs is None else str(seqs.get(p, 0)) for p in parts]
        for p in parts:
            pos = checkpoint.positions.get(p)
            mark = checkpoint.read_marks.get(p)
            wm = checkpoint.watermarks.get(p)
            args += ["" if wm is None else repr(float(wm))]
            args += ["" if pos is None else str(pos), "" if mark is None else str(mark)]
            args += [len(sets[p]) // 2, len(dels[p]), len(colds[p]) // 2]
            args += sets[p] + dels[p] + colds[p]
        args += ["1", checkpoint.extra] if checkpoint.extra is not None else ["0", ""]
        reply = self._call(self._commit_script, keys=keys, args=args)
        if reply[0] == b"fenced":
            p = parts[int(reply[1]) - 1]
            raise FencedError(checkpoint.topic, p, tokens.get(p, -1), int(reply[2]))
        if reply[0] == b"lost":
            p = parts[int(reply[1]) - 1]
            raise StoreLostError(checkpoint.topic, p, reply[2].decode(errors="replace"))
        return sum(map(len, blobs)) + sum(map(len, cold_blobs))

    def load_entity(
        self, topic: str, partition: int, entity: str, layout: RowLayout
    ) -> EntityState | None:
        blob = self._call(self._r.hget, self._key(topic, partition, "rows"), entity)
        if blob is None:
            blob = self._call(self._r.hget, self._key(topic, partition, "cold"), entity)
        return None if blob is None else to_entities(partition, [entity], [blob], layout)[0]

    def load_cold(
        self, topic: str, partition: int, entities: Sequence[str], layout: RowLayout
    ) -> tuple[dict[str, EntityState], list[tuple[int, str, str]]]:
        if not entities:
            return {}, []
        names = list(entities)
        blobs = self._call(self._r.hmget, self._key(topic, partition, "cold"), names)
        found = [(n, bytes(b)) for n, b in zip(names, blobs, strict=True) if b is not None]
        good, bad = to_entities_quarantined(
            partition, [n for n, _ in found], [b for _, b in found], layout
        )
        return {e.entity: e for e in good}, bad

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


def _names_and_blobs(
    partition: int, rows: Mapping[bytes, bytes], quarantined: list[tuple[int, str, str]]
) -> tuple[list[str], list[bytes]]:
    """Decoded entity names and their blobs; a name that is not UTF-8 is quarantined."""
    names, blobs = [], []
    for key, blob in rows.items():
        try:
            names.append(key.decode("utf-8"))
        except UnicodeDecodeError:
            quarantined.append((partition, key.decode("utf-8", "replace"), "name is not UTF-8"))
            continue
        blobs.append(bytes(blob))
    return names, blobs


def _int_or_none(raw: bytes | None, what: str) -> int | None:
    if raw is None or raw == b"":
        return None
    try:
        return int(raw)
    except ValueError:
        raise StateError(f"stored {what} is not an integer: {raw[:40]!r}") from None


def _safe_url(url: str) -> str:
    """The URL without user and password, for messages and logs."""
    return safe_url(url)
