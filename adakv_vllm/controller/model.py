"""The tiny MLP controller and its weights file (safetensors; never pickle).

    features [T, F] -> standardise -> Linear(F, 128) -> ReLU -> Linear(128, 128) -> ReLU
                    -> Linear(128, 5) -> softmax over {2, 3, 4, 8, 16} bits (PRECISIONS)

(the paper's 4->128->128->4, with our F features and five precisions). The softmax is read as the
posterior over each token's label class; `expected_sensitivity` turns it into the planner's
distortion per precision: d(b) = sum_c p(c) * table[c, b], where table[c, b] is the mean measured
sensitivity at b bits of the training tokens of class c (stored with the weights). The greedy
planner then minimises expected KL.

File: one .safetensors with the tensors below and string metadata (format, feature names, the settings
the features depend on). Anything missing, mis-shaped, non-finite or mismatched is a ValueError naming
the file and the problem. No controller is shipped for the current quantizer: the package's weights
folder is empty until one is trained (`adakv train-controller`), and asking for it says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from adakv_vllm.controller.features import FEATURE_NAMES
from adakv_vllm.quant.levels import QUANTIZER_ID
from adakv_vllm.quant.precision import PRECISIONS

FORMAT = "adakv-controller-v1"
HIDDEN = 128
NUM_CLASSES = len(PRECISIONS)
# Where controllers shipped with the package live (policy.SHIPPED_WEIGHTS is the file the learned
# policy reads when no controller_weights are given).
SHIPPED_DIR = Path(__file__).parent / "weights"


class ControllerMLP(nn.Module):
    def __init__(self, num_features: int = len(FEATURE_NAMES), hidden: int = HIDDEN):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        # [class, precision code]: mean sensitivity (nats) of class-c training tokens stored at b bits
        self.register_buffer("class_sensitivity", torch.zeros(NUM_CLASSES, NUM_CLASSES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [T, F] -> logits [T, NUM_CLASSES]."""
        return self.net((features - self.feature_mean) / self.feature_std)

    @torch.no_grad()
    def expected_sensitivity(self, features: torch.Tensor) -> torch.Tensor:
        """-> [T, NUM_CLASSES] expected sensitivity per precision code, non-increasing in precision."""
        return self(features).softmax(-1) @ self.class_sensitivity


def card_path(weights: str | Path) -> Path:
    """The model card written beside a weights file: NAME.safetensors -> NAME.card.json."""
    return Path(weights).with_suffix(".card.json")


def save(model: ControllerMLP, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "features": json.dumps(list(FEATURE_NAMES)), **metadata}
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a weights file, without loading tensors. ValueError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # missing, truncated or foreign files raise several types
        raise ValueError(f"controller weights {path}: not a readable safetensors file ({e})") from e


def load(path: str | Path, expect: dict[str, str] | None = None) -> tuple[ControllerMLP, dict[str, str]]:
    """Load and validate a controller. `expect`: metadata values that must match (e.g. group_size)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file() and path.parent.resolve() == SHIPPED_DIR.resolve():
        raise ValueError(
            f"no learned controller is shipped for this quantizer ({QUANTIZER_ID}): train one with "
            f"`adakv train-controller --out DIR` and pass controller_weights=DIR/{path.name}"
        )
    if not path.is_file():
        raise ValueError(f"controller weights {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise ValueError(f"controller weights {path}: not a readable safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"controller weights {path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        names = json.loads(metadata.get("features", "null"))
    except json.JSONDecodeError as e:
        raise ValueError(f"controller weights {path}: feature list is not JSON ({e})") from e
    if names != list(FEATURE_NAMES):
        raise ValueError(
            f"controller weights {path}: trained on features {names}, "
            f"this version computes {list(FEATURE_NAMES)}"
        )
    for key, value in (expect or {}).items():
        if metadata.get(key) != value:
            raise ValueError(
                f"controller weights {path}: trained with {key}={metadata.get(key)!r}, this run has {value!r}"
            )
    model = ControllerMLP()
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        raise ValueError(f"controller weights {path}: missing tensors {missing}, unexpected {extra}")
    for key, tensor in tensors.items():
        if tensor.shape != wanted[key].shape:
            raise ValueError(
                f"controller weights {path}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(wanted[key].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"controller weights {path}: tensor {key} contains NaN or inf")
    if (tensors["feature_std"] <= 0).any():
        raise ValueError(f"controller weights {path}: feature_std must be positive")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval(), metadata
