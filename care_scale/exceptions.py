"""Exceptions that care-scale raises, in one hierarchy callers can catch.

Every error names the file, table or URI it is about and says what is wrong with it. Messages
never contain credentials: URIs are passed through :func:`care_scale.storage.redact` first.

    CareScaleError
    ├── ConfigError                  bad job / training / export configuration
    │   └── BackendUnavailableError  an optional backend (cuCIM) asked for, not installed
    ├── StorageError                 object storage, staging cache
    ├── SlideError                   one slide cannot be used (carries ``uri``)
    │   ├── SlideNotFoundError
    │   ├── CorruptSlideError
    │   ├── UnsupportedFormatError
    │   ├── NotBrightfieldError      fluorescence, 16-bit, single channel, ...
    │   ├── MissingMPPError          no MPP and no objective power, no override
    │   ├── UnsupportedResolutionError  coarser than TRIDENT's 5x bucket (tiling=trident)
    │   └── NoTissueError            tissue detection found nothing to tile
    ├── ModelInputError              invalid input to an encoder (empty, NaN/inf, bad shape)
    ├── CheckpointError              unreadable / unsafe / mismatching checkpoint
    │   └── UnsafeCheckpointError    would need unpickling of arbitrary objects
    ├── FeatureFileError             patch-feature file cannot be read
    ├── TableError                   Delta table problems (carries ``table``)
    │   └── SchemaVersionError
    ├── ExportError
    │   ├── ParityError              exported model disagrees with PyTorch
    │   └── TensorRTUnavailableError no CUDA device / TensorRT installed
    ├── TrainingDataError            molecular tables, sample ids, gene lists
    ├── LabelsError                  labels CSV / split files of a probe (carries ``path``)
    └── AnnotationError              a slide's annotation GeoJSON (carries ``path``)
"""

from __future__ import annotations


class CareScaleError(Exception):
    """Base class of every error care-scale raises on purpose."""


class CareScaleWarning(UserWarning):
    """Base class of care-scale's warnings. The CLI prints each as one line
    (``UntrainedWeightsWarning: ...``); library users get ordinary Python warnings."""


class UntrainedWeightsWarning(CareScaleWarning):
    """A model runs on seeded random weights: its embeddings carry no biological meaning."""


class ConfigError(CareScaleError, ValueError):
    """A configuration value is missing, unknown or invalid."""


class BackendUnavailableError(ConfigError):
    """A backend was asked for by name, but its optional package is not installed."""


class StorageError(CareScaleError, OSError):
    """Reading or writing object storage (or the local staging cache) failed.
    ``transient``: a reset, timeout or 5xx that a retry may cure."""

    transient: bool = False


class SlideError(CareScaleError):
    """One slide cannot be used. ``uri`` names it (credentials redacted)."""

    def __init__(self, uri: str, reason: str):
        self.uri = str(uri)
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist."""

    def __init__(self, uri: str, reason: str = "no such file"):
        SlideError.__init__(self, uri, reason)


class CorruptSlideError(SlideError):
    """The file looks like a slide format but cannot be decoded (truncated, damaged)."""


class UnsupportedFormatError(SlideError):
    """No backend can read this kind of file."""


class NotBrightfieldError(SlideError):
    """The image is not 8-bit RGB brightfield (fluorescence, 16-bit, one channel, ...)."""


class MissingMPPError(SlideError):
    """The slide has neither MPP nor objective power, and no override was given."""


class UnsupportedResolutionError(SlideError):
    """TRIDENT's magnification rule has no bucket for the slide's MPP (coarser than 2.4)."""


class NoTissueError(SlideError):
    """Tissue detection found no tissue tiles on the slide."""


class ModelInputError(CareScaleError, ValueError):
    """Input to an encoder is invalid (empty, non-finite, wrong shape)."""


class CheckpointError(CareScaleError):
    """A checkpoint cannot be loaded into the model (missing file, keys, shapes)."""


class UnsafeCheckpointError(CheckpointError):
    """Loading would need to unpickle arbitrary objects; refused."""


class FeatureFileError(CareScaleError):
    """A patch-feature file (h5, Parquet, CARE .npy) cannot be read."""


class TableError(CareScaleError):
    """A Delta table cannot be read or written. ``table`` names it."""

    def __init__(self, table: str, reason: str):
        self.table = str(table)
        self.reason = reason
        super().__init__(f"{self.table}: {reason}")


class SchemaVersionError(TableError):
    """The table was written with a schema version this code does not read."""


class ExportError(CareScaleError):
    """Exporting or compiling a model failed."""


class ParityError(ExportError):
    """The exported model's outputs differ from PyTorch's beyond tolerance."""


class TensorRTUnavailableError(ExportError):
    """TensorRT was asked for, but no CUDA device or TensorRT install is present."""


class TrainingDataError(CareScaleError, ValueError):
    """Training inputs are inconsistent (sample ids, NaN values, empty tables, gene lists)."""


class LabelsError(CareScaleError, ValueError):
    """A labels CSV or split file of ``care-scale probe`` cannot be used. ``path`` names it."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AnnotationError(CareScaleError, ValueError):
    """A slide's annotation file (QuPath / GeoJSON) cannot be used. ``path`` names it (the
    caller passes it redacted, as for slide errors: this module imports nothing of ours)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
