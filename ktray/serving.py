"""The MLflow pyfunc model of a ktray classifier or segmenter (no ray, no Config, no torch at
import).

:class:`ImageClassifierModel` wraps an exported ONNX model (onnxruntime) or, when there is no
ONNX file, the PyTorch checkpoint (then ktray must be importable where it is served). Input:
a DataFrame with an ``image`` column of encoded image bytes (``mlflow models serve`` takes
them base64-encoded in JSON), or a float32 array ``[B, 3, S, S]`` of normalised images.
Output: a DataFrame with ``pred`` (class index), ``prob`` (its probability) and ``label``
(the class name when the spec has ``class_names``, else the index as text).

The preprocessing repeats ``ktray.data.views.eval_transform`` in numpy + PIL (RGB conversion,
bilinear resize to S x S, mean / std), so the served model predicts what ktray predicts.
:func:`log_pyfunc_model` pickles this module and :mod:`ktray.seg_masks` by value: the logged
model needs only mlflow, numpy, pandas, pillow and onnxruntime, not ktray.
"""

from __future__ import annotations

import io
import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from ktray.seg_masks import logits_to_mask, mask_png

IMAGE_COLUMN = "image"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as ktray's views make it (alpha on white, 16-bit / float scaled to 0..255)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8))
    return img.convert("RGB")


def preprocess(data: bytes, size: int, mean, std) -> np.ndarray:
    """Encoded image bytes -> normalised ``[3, size, size]`` float32."""
    img = to_rgb(Image.open(io.BytesIO(data)))
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=(0, 0, *img.size))
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1) * 255.0
    s = np.asarray(std, np.float32).reshape(-1, 1, 1) * 255.0
    return (a - m) / s


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: artifacts ``spec`` (model.json) and ``onnx`` (model.onnx) or ``checkpoint``
    (a ktray checkpoint folder)."""

    def load_context(self, context):
        with open(context.artifacts["spec"]) as f:
            self.spec = json.load(f)
        if "onnx" in context.artifacts:
            import onnxruntime as ort

            session = ort.InferenceSession(
                context.artifacts["onnx"], providers=["CPUExecutionProvider"]
            )
            name = session.get_inputs()[0].name
            self._logits = lambda x: session.run(None, {name: x})[0]
        else:
            import torch

            from ktray.models import load_model

            model = load_model(context.artifacts["checkpoint"])[0].eval()

            def logits(x):
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).float().numpy()

            self._logits = logits

    def predict(self, context, model_input: pd.DataFrame, params=None):
        size, mean, std = self.spec["img_size"], self.spec["mean"], self.spec["std"]
        if isinstance(model_input, pd.DataFrame):
            x = np.stack([preprocess(bytes(b), size, mean, std) for b in model_input[IMAGE_COLUMN]])
        else:
            x = np.asarray(model_input, dtype=np.float32)
        z = (
            np.concatenate(
                [self._logits(np.ascontiguousarray(x[i : i + 64])) for i in range(0, len(x), 64)]
            )
            if len(x)
            else np.zeros((0, 1))
        )
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        pred = p.argmax(1)
        names = self.spec.get("class_names") or []
        return pd.DataFrame(
            {
                "pred": pred.astype(np.int64),
                "prob": p.max(1).astype(np.float64),
                "label": [names[i] if i < len(names) else str(int(i)) for i in pred],
            }
        )


class ImageSegmenterModel(ImageClassifierModel):
    """pyfunc model of a segmentation checkpoint (``seg_*`` spec), same artifacts and input.
    Output: a DataFrame with ``mask`` (PNG bytes: ``uint8`` class index per pixel at the input
    image's own size; the logits resized bilinearly, then the argmax, as ktray evaluates) and
    ``classes`` (the class indices present in the mask, comma separated)."""

    def predict(self, context, model_input: pd.DataFrame, params=None):
        size, mean, std = self.spec["img_size"], self.spec["mean"], self.spec["std"]
        if isinstance(model_input, pd.DataFrame):
            blobs = [bytes(b) for b in model_input[IMAGE_COLUMN]]
            sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
            x = np.stack([preprocess(b, size, mean, std) for b in blobs]) if blobs else None
        else:
            x = np.asarray(model_input, dtype=np.float32)
            sizes = [(size, size)] * len(x)
        masks, classes = [], []
        for i in range(0, len(sizes), 16):
            z = self._logits(np.ascontiguousarray(x[i : i + 16]))  # [b, C, h, w]
            for logits, (w, h) in zip(z, sizes[i : i + 16]):
                mask = logits_to_mask(logits, (h, w))
                masks.append(mask_png(mask))
                classes.append(",".join(str(int(v)) for v in np.unique(mask)))
        return pd.DataFrame({"mask": masks, "classes": classes})


def model_class(spec: dict) -> type:
    """The pyfunc class of a checkpoint spec: segmenter for ``seg_*`` kinds, else classifier."""
    return (
        ImageSegmenterModel
        if str(spec.get("kind", "")).startswith("seg_")
        else ImageClassifierModel
    )


def log_pyfunc_model(
    mlflow_module,
    artifact_path: str,
    artifacts: dict,
    example: bytes,
    extra_files: dict | None = None,
) -> None:
    """Save the pyfunc model to a temporary folder and log it as run artifacts under
    ``artifact_path`` (a folder with an ``MLmodel`` that ``mlflow.pyfunc.load_model`` and
    ``mlflow models serve`` load), plus ``extra_files`` (``{name: local path}``) beside it.

    Args:
        mlflow_module: The ``mlflow`` module with an active run.
        artifact_path: Run-relative folder, e.g. ``student``.
        artifacts: ``{"spec": model.json, "onnx": model.onnx}`` or ``{"spec", "checkpoint"}``.
        example: Encoded bytes of one image: the input example the signature comes from.
        extra_files: Files copied into the folder as they are (the checkpoint, for reuse).
    """
    import os
    import shutil
    import sys
    import tempfile

    import cloudpickle
    from mlflow.models import infer_signature

    example_df = pd.DataFrame({IMAGE_COLUMN: [example]})
    context = type("Ctx", (), {"artifacts": artifacts})()
    with open(artifacts["spec"]) as f:
        cls = model_class(json.load(f))
    probe = cls()  # loaded to infer the signature; the saved one stays empty
    probe.load_context(context)
    signature = infer_signature(example_df, probe.predict(context, example_df))
    model = cls()
    reqs = [f"{m}=={__import__(m).__version__}" for m in ("numpy", "pandas", "cloudpickle")]
    reqs += ["pillow", "onnxruntime" if "onnx" in artifacts else "torch"]
    try:
        import onnxruntime

        reqs[-1] = f"onnxruntime=={onnxruntime.__version__}" if "onnx" in artifacts else reqs[-1]
    except ImportError:
        pass
    by_value = [sys.modules[__name__], sys.modules[logits_to_mask.__module__]]
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_path.rstrip("/")))
            mlflow_module.pyfunc.save_model(
                path,
                python_model=model,
                artifacts=artifacts,
                signature=signature,
                input_example=example_df,
                pip_requirements=reqs,
            )
            for name, src in (extra_files or {}).items():
                shutil.copy(src, os.path.join(path, name))
            mlflow_module.log_artifacts(path, artifact_path=artifact_path)
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)
