from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("message", "server_version", "models", "default_model", "model_summaries")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    message: str
    server_version: str
    models: _containers.RepeatedScalarFieldContainer[str]
    default_model: str
    model_summaries: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, message: _Optional[str] = ..., server_version: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., default_model: _Optional[str] = ..., model_summaries: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "family", "native_size", "inpainting", "default_steps", "default_cfg_scale", "default_sampler", "size_multiple")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NATIVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    native_size: int
    inpainting: bool
    default_steps: int
    default_cfg_scale: float
    default_sampler: str
    size_multiple: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., native_size: _Optional[int] = ..., inpainting: _Optional[bool] = ..., default_steps: _Optional[int] = ..., default_cfg_scale: _Optional[float] = ..., default_sampler: _Optional[str] = ..., size_multiple: _Optional[int] = ...) -> None: ...

class FilesExistRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ...) -> None: ...

class FilesExistResponse(_message.Message):
    __slots__ = ("files", "exists", "errors")
    FILES_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ..., exists: _Optional[_Iterable[bool]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageGenerationRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed", "sampler", "restore_faces", "enable_hr", "denoising_strength", "batch_size", "batch_count", "model", "hr_scale", "clip_skip", "loras", "preview_every", "output_format", "quality", "init_image", "mask", "mask_blur", "skip_mask_overlay", "seed_mode", "zero_negative_prompt", "original_width", "original_height", "crop_top", "crop_left", "target_width", "target_height", "negative_original_width", "negative_original_height", "negative_crop_top", "negative_crop_left", "negative_target_width", "negative_target_height", "mask_outset", "true_cfg_scale", "shift")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FACES_FIELD_NUMBER: _ClassVar[int]
    ENABLE_HR_FIELD_NUMBER: _ClassVar[int]
    DENOISING_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HR_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    SKIP_MASK_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    SEED_MODE_FIELD_NUMBER: _ClassVar[int]
    ZERO_NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASK_OUTSET_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str
    restore_faces: bool
    enable_hr: bool
    denoising_strength: float
    batch_size: int
    batch_count: int
    model: str
    hr_scale: float
    clip_skip: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    preview_every: int
    output_format: str
    quality: int
    init_image: bytes
    mask: bytes
    mask_blur: int
    skip_mask_overlay: bool
    seed_mode: str
    zero_negative_prompt: bool
    original_width: int
    original_height: int
    crop_top: int
    crop_left: int
    target_width: int
    target_height: int
    negative_original_width: int
    negative_original_height: int
    negative_crop_top: int
    negative_crop_left: int
    negative_target_width: int
    negative_target_height: int
    mask_outset: int
    true_cfg_scale: float
    shift: float
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., sampler: _Optional[str] = ..., restore_faces: _Optional[bool] = ..., enable_hr: _Optional[bool] = ..., denoising_strength: _Optional[float] = ..., batch_size: _Optional[int] = ..., batch_count: _Optional[int] = ..., model: _Optional[str] = ..., hr_scale: _Optional[float] = ..., clip_skip: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ..., preview_every: _Optional[int] = ..., output_format: _Optional[str] = ..., quality: _Optional[int] = ..., init_image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., mask_blur: _Optional[int] = ..., skip_mask_overlay: _Optional[bool] = ..., seed_mode: _Optional[str] = ..., zero_negative_prompt: _Optional[bool] = ..., original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., crop_top: _Optional[int] = ..., crop_left: _Optional[int] = ..., target_width: _Optional[int] = ..., target_height: _Optional[int] = ..., negative_original_width: _Optional[int] = ..., negative_original_height: _Optional[int] = ..., negative_crop_top: _Optional[int] = ..., negative_crop_left: _Optional[int] = ..., negative_target_width: _Optional[int] = ..., negative_target_height: _Optional[int] = ..., mask_outset: _Optional[int] = ..., true_cfg_scale: _Optional[float] = ..., shift: _Optional[float] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("file", "weight")
    FILE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    file: str
    weight: float
    def __init__(self, file: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ImageGenerationResponse(_message.Message):
    __slots__ = ("images", "info", "events")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    info: str
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., info: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("filename", "data", "sha256", "total_size", "overwrite")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    filename: str
    data: bytes
    sha256: str
    total_size: int
    overwrite: bool
    def __init__(self, filename: _Optional[str] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class UploadFileResponse(_message.Message):
    __slots__ = ("message", "size", "sha256")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    message: str
    size: int
    sha256: str
    def __init__(self, message: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GenerationUpdate(_message.Message):
    __slots__ = ("event", "preview", "image_index", "image_data", "image_done", "info")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DONE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    event: str
    preview: bytes
    image_index: int
    image_data: bytes
    image_done: bool
    info: str
    def __init__(self, event: _Optional[str] = ..., preview: _Optional[bytes] = ..., image_index: _Optional[int] = ..., image_data: _Optional[bytes] = ..., image_done: _Optional[bool] = ..., info: _Optional[str] = ...) -> None: ...
