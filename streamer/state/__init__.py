"""State storage: what a checkpoint holds, how it is encoded, and where it lives.

`StateStore` (store.py) is the contract; `MemoryStore` implements it in process for unit
tests and `RedisStore` (redis_store.py) against Redis. One contract test runs against both.
"""

from .format import RowLayout, decode_rows, encode_rows
from .store import Checkpoint, EntityState, LoadedState, MemoryStore, StateStore

__all__ = [
    "Checkpoint",
    "EntityState",
    "LoadedState",
    "MemoryStore",
    "RowLayout",
    "StateStore",
    "decode_rows",
    "encode_rows",
]
