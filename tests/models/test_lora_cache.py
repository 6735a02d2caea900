"""The LoRA adapter cache: least recently used first, never an adapter of the request being served."""

from __future__ import annotations

from dts_util.models.lora import MAX_CACHED_ADAPTERS, _adapters, _evict_if_full, _mark_used


class Module:
    """Stands in for a PEFT-wrapped UNet: adapters are deleted by name."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete_adapters(self, name: str) -> None:
        self.deleted.append(name)


def test_eviction_takes_the_least_recently_used_and_spares_the_current_request() -> None:
    module = Module()
    for index in range(MAX_CACHED_ADAPTERS):
        _adapters(module)[f"a{index}"] = True
    _mark_used(module, frozenset({"a0", "a1"}))  # a later request used the two oldest again
    _evict_if_full(module, keep=frozenset({"a2"}))  # the request being loaded needs a2 and a new one
    assert module.deleted == ["a3"]  # not a0/a1 (recently used), not a2 (this request's)
    assert list(_adapters(module)) == ["a2", "a4", "a5", "a6", "a7", "a0", "a1"]
