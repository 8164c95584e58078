"""The quantization plan: what the quantize stage decided for each linear, saved as quant_plan.json and read by
export, verify and the reports. Plain data without torch: verify's graph checks read it in a process that never
imports torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModuleEntry:
    name: str
    status: str  # "quantized" | "skipped" | "float"
    reason: str
    smoothed: bool
    alpha: float | None
    input_absmax: float | None = None  # the range mapped to 127: after smoothing and the range estimator
    input_scale: float | None = None
    weight_scale_min: float | None = None
    weight_scale_max: float | None = None
    smoothing_factor_max: float | None = None
    weight_bits: int | None = None
    group_size: int | None = None  # input columns per weight scale; in_features when per output channel
    weight_method: str | None = None  # "rtn" | "gptq" | "imported"
    output_error: float | None = None  # GPTQ: ||W X_f - Q X||^2 / ||W X_f||^2 on the calibration rows
    rtn_output_error: float | None = None  # the same for round-to-nearest, for comparison
    damp: float | None = None  # GPTQ dampening finally used (more than asked when H was not positive definite)
    clip_ratio_mean: float | None = None  # --weight-clip mse: mean of the rows' clipping ratios (1.0: none clipped)
    clipped_rows: int | None = None  # rows whose INT8 scale maps less than their max|w| to 127
    rotation_block: int | None = None  # input rotated online by a block Hadamard of this size (rotation.py)


@dataclass(frozen=True)
class QuantPlan:
    recipe: str
    alpha: float | str  # the global alpha, or "auto" / "grid" (the chosen values are per module)
    range_estimator: str = "max"
    modules: tuple[ModuleEntry, ...] = field(default_factory=tuple)

    def quantized(self) -> list[ModuleEntry]:
        return [m for m in self.modules if m.status == "quantized"]

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "alpha": self.alpha, "range_estimator": self.range_estimator,
                "modules": [asdict(m) for m in self.modules]}

    @classmethod
    def from_json(cls, data: dict) -> "QuantPlan":
        return cls(data["recipe"], data["alpha"], data["range_estimator"],
                   tuple(ModuleEntry(**m) for m in data["modules"]))
