"""PEFT adapters of every weight-changing type: one module per type, one interface, one registry.

Example::

    from deltakit.adapters import open_adapter
    adapter = open_adapter("my-loha")
    adapter.peft_type, sorted(adapter.modules)
"""

from deltakit.adapters.base import AdapterModule, BaseInfo
from deltakit.adapters.pairs import adapter_pairs, replacement_pairs
from deltakit.adapters.registry import ACTIVATION_ONLY, TYPES, Adapter, base_info, open_adapter

__all__ = ["AdapterModule", "BaseInfo", "adapter_pairs", "replacement_pairs", "Adapter", "open_adapter", "base_info", "TYPES",
           "ACTIVATION_ONLY"]
