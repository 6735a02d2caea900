"""The app's file names for models and LoRAs, mapped onto the model store.

The app names models and LoRAs by its own files (``sd_v1.5_f16.ckpt``,
``style_lora_f16.ckpt``); the store holds diffusers folders and ``.safetensors``
files under names of their own. Three rules, in order:

1. ``drawthings-names.json`` at the store's root, which the user edits:
   ``{"sd_v1.5_f16.ckpt": "sd15", "style_lora_f16.ckpt": "loras/style.safetensors"}``;
2. the name Echo lists for each store model: its path with ``/`` as ``_`` and ``.ckpt`` as the suffix
   (``checkpoints/dreamshaper_8.safetensors`` is ``checkpoints_dreamshaper_8.ckpt``);
3. automatic matching: the app name without its suffixes (``_f16``, ``_q6p_q8p``, ``_lora``,
   ``.ckpt``) against the file or folder names in the store, used only when exactly one matches.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from dts_util.client_text import quote
from dts_util.errors import InvalidRequest, ModelLoadError, ModelNotFound
from dts_util.limits import MAX_PATH_CHARS

MAPPING_FILE = "drawthings-names.json"
MAX_MAPPING_BYTES = 1024 * 1024
# What the app appends to a file name: precision and quantization tags, LoRA and video markers.
_APP_SUFFIXES = re.compile(r"(_(f16|f32|bf16|q\d+p|8bit|4bit|lora|svd|ti))+$", re.IGNORECASE)
_STORE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def listed_name(store_name: str) -> str:
    """The file name Echo lists for a store model (the app keeps model files as ``.ckpt``)."""
    path = store_name.replace("\\", "/").strip("/")
    for suffix in _STORE_SUFFIXES:
        path = path.removesuffix(suffix)
    return path.replace("/", "_") + ".ckpt"


def _stem(name: str) -> str:
    """A file name without its folders and suffixes (the app's and the store's)."""
    stem = PurePosixPath(name.replace("\\", "/")).name
    for suffix in _STORE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return _APP_SUFFIXES.sub("", stem)


def _key(name: str) -> str:
    """A name reduced for matching: no folders, suffixes or case."""
    return _stem(name).casefold()


class AppNames:
    """App file names <-> store names for one model store.

    Args:
        store: the model store (``ModelStore``).
        snapshot: read the store and the names file once, for every question asked of this object (one call's
            many names); otherwise each question sees the store as it is now.
    """

    def __init__(self, store, snapshot: bool = False) -> None:
        self.store = store
        self._memo: dict[str, object] | None = {} if snapshot else None

    def _remembered(self, key: str, compute):
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _model_names(self) -> list[str]:
        return self._remembered("models", self.store.model_names)

    def user_mapping(self) -> dict[str, str]:
        """``drawthings-names.json``: app file name -> store path; absent is empty, malformed is an error."""
        return self._remembered("mapping", self._read_mapping)

    def _read_mapping(self) -> dict[str, str]:
        path = self.store.root / MAPPING_FILE
        if not path.is_file():
            return {}
        try:
            if path.stat().st_size > MAX_MAPPING_BYTES:
                raise ValueError
            mapping = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in mapping.items()):
                raise ValueError
        except (OSError, ValueError):
            raise ModelLoadError(f"{MAPPING_FILE} in the model store must be a JSON object of app file name -> "
                                 "store path (at most 1 MiB); fix or remove it") from None
        return mapping

    def listed_models(self) -> dict[str, str]:
        """The names Echo lists, each with the store model it stands for (names two models share are left out,
        unless the mapping file names one)."""
        automatic: dict[str, list[str]] = {}
        for name in self._model_names():
            automatic.setdefault(listed_name(name), []).append(name)
        listed = {app: names[0] for app, names in automatic.items() if len(names) == 1}
        models = set(self._model_names())
        listed.update({app: target for app, target in self.user_mapping().items() if target in models})
        return listed

    def model(self, app_file: str) -> str:
        """The store model for the app's ``model`` ("" stays "": the server's default model)."""
        if not app_file:
            return ""
        self._check_length(app_file)
        mapped = self.user_mapping().get(app_file) or self.listed_models().get(app_file)
        if mapped:
            return mapped
        matches = [name for name in self._model_names() if _key(name) == _key(app_file)]
        if len(matches) == 1:
            return matches[0]
        listed = ", ".join(sorted(self.listed_models())) or "none"
        hint = f"it matches {len(matches)} models; " if matches else ""
        raise ModelNotFound(f"the app's model {quote(app_file)} is not on this server ({hint}models here: {listed}); "
                            f"pick one of those, or map the name in {MAPPING_FILE} in the model store")

    def lora(self, app_file: str) -> str:
        """The store path of the LoRA the app names (mapped, or found as a prompt tag would find it), checked to
        be a LoRA file; ModelNotFound or ModelLoadError otherwise."""
        from dts_util.models.lora import resolve_loras
        from dts_util.pipeline.params import LoraRequest

        self._check_length(app_file)
        mapped = self.user_mapping().get(app_file)
        request = LoraRequest(mapped, 1.0) if mapped else LoraRequest(_stem(app_file), 1.0, from_prompt=True)
        return resolve_loras(self.store, (request,))[0].name

    def path(self, app_file: str):
        """The store file or folder of the model or LoRA the app names, or None when the server has none."""
        for find in (self.model, self.lora):
            try:
                return self.store.resolve(find(app_file))
            except (ModelNotFound, ModelLoadError, InvalidRequest):
                continue
        return None

    @staticmethod
    def _check_length(name: str) -> None:
        if len(name) > MAX_PATH_CHARS:
            raise InvalidRequest(f"a file name has {len(name)} characters; send at most {MAX_PATH_CHARS}")
