"""The JSON files deltakit reads beside weights: ``config.json``, shard indexes, ``adapter_config.json``.

:func:`read_json` reads one such file without ever hanging or recursing without bound, and the
validators check the keys deltakit uses against the types transformers and PEFT give them.
Each refusal is one :class:`DeltakitError` line naming the file and the key; keys deltakit does
not read are left alone (both libraries accept arbitrary extra keys).

Example::

    config = validate_adapter_config(read_json(folder / "adapter_config.json"), folder / "adapter_config.json")
    r = config.get("r", 8)          # present keys have PEFT's types; absent ones take PEFT's defaults
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deltakit.errors import DeltakitError
from deltakit.io.paths import read_regular_bytes

MAX_JSON_BYTES = 64 * 2**20  # configs and shard indexes are kilobytes to a few megabytes
MAX_NESTING = 127  # serde_json's recursion limit (safetensors headers); configs nest a few levels


def nesting_depth(text: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, outside strings; vectorised (headers reach 100 MB)."""
    import numpy as np

    outside_strings = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b'""', text)
    codes = np.frombuffer(outside_strings, dtype=np.uint8)
    deepest, level = 0, 0
    for begin in range(0, len(codes), 1 << 22):
        chunk = codes[begin:begin + (1 << 22)]
        steps = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int64)
        steps -= (chunk == ord("]")) | (chunk == ord("}"))
        if not steps.any():
            continue
        levels = np.cumsum(steps) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def short_json(value: Any) -> str:
    """A JSON value as one short line for a message (at most 60 characters)."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: str | os.PathLike) -> Any:
    """The value of a JSON file, refusing with one line what is not a small, well-formed JSON document.

    Opens only a regular file (a FIFO or device is refused before any read, so nothing blocks),
    of at most :data:`MAX_JSON_BYTES`, strict UTF-8 without a byte-order mark (as transformers
    and PEFT read it), nested at most :data:`MAX_NESTING` deep, without NaN / Infinity or an
    unpaired surrogate escape.
    """
    raw = _read_regular_file(Path(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeltakitError(f"{path} is not valid JSON: not UTF-8 text (byte {exc.start})") from None
    if nesting_depth(raw) > MAX_NESTING:
        raise DeltakitError(f"{path} is not valid JSON for deltakit: it is nested more than {MAX_NESTING} deep")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise DeltakitError(f"{path} is not valid JSON: {_first_line(exc)}") from None
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):
        try:  # Python keeps a lone surrogate escape; it cannot be printed or encoded
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DeltakitError(f"{path} is not valid JSON: it has an unpaired \\u surrogate escape") from None
    return value


def _read_regular_file(path: Path) -> bytes:
    try:
        return read_regular_bytes(path, MAX_JSON_BYTES)
    except OSError as exc:
        raise DeltakitError(f"cannot read {path}: {exc.strerror or exc}") from None


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------- kinds of values


@dataclass(frozen=True)
class Kind:
    """What a key's value must be: a test and the words a message uses for it."""

    accepts: Callable[[Any], bool]
    words: str


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


INTEGER = Kind(lambda v: type(v) is int, "an integer")
POSITIVE_INTEGER = Kind(lambda v: type(v) is int and v > 0, "a positive integer")
COUNT = Kind(lambda v: type(v) is int and v >= 0, "a non-negative integer")
NUMBER = Kind(_number, "a finite number")
BOOLEAN = Kind(lambda v: type(v) is bool, "true or false")
STRING = Kind(lambda v: isinstance(v, str), "a string")
OBJECT = Kind(lambda v: isinstance(v, dict), "an object")
STRINGS = Kind(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings")
INTEGERS = Kind(lambda v: isinstance(v, list) and all(type(i) is int for i in v), "a list of integers")
BOOLEANS = Kind(lambda v: isinstance(v, list) and all(type(b) is bool for b in v), "a list of true/false")


def either(*kinds: Kind) -> Kind:
    return Kind(lambda v: any(k.accepts(v) for k in kinds), " or ".join(k.words for k in kinds))


def optional(kind: Kind) -> Kind:
    """``kind`` or null (the library's default applies)."""
    return Kind(lambda v: v is None or kind.accepts(v), f"{kind.words} or null")


def check_keys(config: dict[str, Any], kinds: dict[str, Kind], path: str | os.PathLike) -> None:
    """Refuse the first present key of ``kinds`` whose value is not of its kind; absent keys are fine."""
    for key, kind in kinds.items():
        if key in config and not kind.accepts(config[key]):
            raise DeltakitError(f"{path}: {json.dumps(key)} must be {kind.words}, not {short_json(config[key])}")


def _object_of(value: Any, path: str | os.PathLike, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DeltakitError(f"{path} is not {what}: it holds {short_json(value)}, not a JSON object")
    return value


# ---------------------------------------------------------------- shard index


def validate_shard_index(index: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A ``*.index.json``: an object whose ``weight_map`` maps tensor names to shard file names (strings).

    Types only: whether each file name stays inside the folder is the caller's to check.
    """
    index = _object_of(index, path, "a shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        problem = "has no" if weight_map is None else f"has a {short_json(weight_map)} as its"
        raise DeltakitError(f"{path} is not a shard index: it {problem} \"weight_map\" object")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise DeltakitError(f"{path}: \"weight_map\" gives tensor {json.dumps(name)} the shard "
                                f"{short_json(file)}; shard names are strings")
    return index


# ---------------------------------------------------------------- config.json

# The keys of config.json deltakit reads, with the types transformers gives them (PreTrainedConfig
# and the model configs); null is allowed where some model class leaves the key unset.
MODEL_CONFIG_KEYS: dict[str, Kind] = {
    "model_type": STRING,
    "architectures": optional(STRINGS),
    "tie_word_embeddings": optional(BOOLEAN),
    "hidden_size": optional(COUNT),
    "intermediate_size": optional(COUNT),
    "num_hidden_layers": optional(COUNT),
    "vocab_size": optional(COUNT),
    "num_local_experts": optional(COUNT),
    "dtype": optional(either(STRING, OBJECT)),  # an object of sub-config dtypes for composite models
    "torch_dtype": optional(either(STRING, OBJECT)),
    "quantization_config": optional(OBJECT),
}
QUANTIZATION_KEYS: dict[str, Kind] = {
    "quant_method": optional(STRING),
    "load_in_4bit": optional(BOOLEAN),
    "load_in_8bit": optional(BOOLEAN),
    "weight_block_size": optional(Kind(lambda v: isinstance(v, list) and len(v) == 2 and all(
        type(n) is int and n > 0 for n in v), "two positive integers")),
}


def validate_model_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A ``config.json``: an object whose keys deltakit reads (:data:`MODEL_CONFIG_KEYS`) have transformers' types."""
    config = _object_of(config, path, "a model config")
    check_keys(config, MODEL_CONFIG_KEYS, path)
    quantization = config.get("quantization_config")
    if quantization is not None:
        check_keys(quantization, QUANTIZATION_KEYS, f"{path}: quantization_config")
    return config


# ---------------------------------------------------------------- adapter_config.json

# The keys of adapter_config.json deltakit reads, typed as every PEFT config types them.
ADAPTER_KEYS: dict[str, Kind] = {
    "peft_type": optional(STRING),
    "fan_in_fan_out": BOOLEAN,
    "target_modules": optional(either(STRING, STRINGS)),
    "modules_to_save": optional(STRINGS),
    "layers_to_transform": optional(either(INTEGER, INTEGERS)),
}
# PEFT looks patterns up with ``config.rank_pattern.keys()``: null is not an empty pattern there.
_LORA_FAMILY = {"r": POSITIVE_INTEGER, "rank_pattern": OBJECT, "alpha_pattern": OBJECT}
_LYCORIS = {**_LORA_FAMILY, "alpha": NUMBER, "rank_dropout": NUMBER, "module_dropout": NUMBER,
            "use_effective_conv2d": BOOLEAN}
# The keys of each type deltakit reads natively (PEFT's LoraConfig, AdaLoraConfig, LoHaConfig,
# LoKrConfig, VeraConfig, IA3Config). Other types are read by PEFT itself (deltakit.adapters.peft_layer).
TYPE_KEYS: dict[str, dict[str, Kind]] = {
    "LORA": {**_LORA_FAMILY, "lora_alpha": NUMBER, "use_rslora": BOOLEAN, "use_dora": BOOLEAN,
             "lora_bias": BOOLEAN, "use_qalora": BOOLEAN, "target_parameters": optional(STRINGS)},
    "ADALORA": {"init_r": COUNT, "target_r": COUNT, "lora_alpha": NUMBER, "rank_pattern": optional(OBJECT)},
    "LOHA": _LYCORIS,
    "LOKR": {**_LYCORIS, "decompose_both": BOOLEAN, "decompose_factor": INTEGER},
    "VERA": {"r": POSITIVE_INTEGER, "projection_prng_key": INTEGER, "save_projection": BOOLEAN, "d_initial": NUMBER},
    "IA3": {"feedforward_modules": optional(either(STRING, STRINGS))},
}


def peft_pattern(key: str) -> re.Pattern[str]:
    """The regex PEFT matches a ``rank_pattern`` / ``alpha_pattern`` key with: the module name or a
    dotted suffix of it (peft.utils.other.get_pattern_key)."""
    return re.compile(rf"(.*\.)?({key})$")


def validate_adapter_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """An ``adapter_config.json`` whose keys deltakit reads have the types and values PEFT accepts.

    Besides the types of :data:`ADAPTER_KEYS` and :data:`TYPE_KEYS`: ``r`` and every
    ``rank_pattern`` value is a positive integer (PEFT refuses r <= 0; a missing ``r`` takes
    PEFT's default, an explicit null does not), ``alpha_pattern`` values are finite numbers, and
    every pattern key compiles as the regex PEFT matches it with. AdaLoRA's ``rank_pattern``
    is its saved budget: module names to lists of true/false.
    """
    config = _object_of(config, path, "an adapter config")
    check_keys(config, ADAPTER_KEYS, path)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    type_keys = TYPE_KEYS.get(peft_type, {})
    check_keys(config, type_keys, path)
    if peft_type == "ADALORA":
        _check_pattern(config, "rank_pattern", BOOLEANS, path, regex=False)
    elif "rank_pattern" in type_keys:
        _check_pattern(config, "rank_pattern", POSITIVE_INTEGER, path, regex=True)
        _check_pattern(config, "alpha_pattern", NUMBER, path, regex=True)
    return config


def _check_pattern(config: dict[str, Any], name: str, kind: Kind, path: str | os.PathLike, regex: bool) -> None:
    for key, value in (config.get(name) or {}).items():
        if not kind.accepts(value):
            raise DeltakitError(f"{path}: {json.dumps(name)} entry {json.dumps(key)} must be {kind.words}, "
                                f"not {short_json(value)}")
        if regex:
            try:
                peft_pattern(key)
            except (re.error, RecursionError, OverflowError) as exc:
                reason = exc.msg if isinstance(exc, re.error) else _first_line(exc)
                raise DeltakitError(f"{path}: {json.dumps(name)} key {json.dumps(key)} is not a regular "
                                    f"expression PEFT can match modules with ({reason})") from None
