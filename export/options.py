"""Export options, validated once where they are made."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_qwen.config import QwenConfig
from edge_qwen.export import targets
from edge_qwen.export.recipe import Recipe, make_recipe

PRECISIONS = ("fp32", "fp16", "int8", "int4")
LOGITS = ("last", "all")
DEFAULT_MAX_CONTEXT = 4096
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# auto: the multi-domain mix (quant/suite.py) when its texts can be had, else the built-in text.
CALIBRATIONS = ("auto", "builtin", "suite")
GGUF_EXACT = "gguf"  # algo: carry a GGUF's quantized blocks over as they are


@dataclass(frozen=True)
class ExportOptions:
    """What to export: precision and quantization recipe, context size, which logits to keep."""

    precision: str = "fp32"
    max_context: int | None = None  # None: min(DEFAULT_MAX_CONTEXT, the model's own maximum)
    logits: str = "all"  # the graph's default; edge-qwen's runtime feeds logits_start to keep the last
    block_size: int = 32
    algo: str = "kquant"
    symmetric: bool = False
    embeddings: str | None = None  # None: the recipe's default for this precision
    lm_head: str | None = None
    mixed: bool = True  # int4 only: sensitive tensors at int8
    block_sizes: tuple[tuple[str, int], ...] = ()  # (weight, block size) off block_size (recipe.py)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute, the fast path on ARM dotprod and x86 VNNI
    calibration: str = "builtin"  # builtin: Python's code and docs; suite: quant/suite.py's mix; auto
    target_cpu: str = targets.ANY  # x86, a76, a72 (export/targets.py); "auto" resolves to this machine

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be 'last' or 'all', got {self.logits!r}")
        if self.max_context is not None and self.max_context < 16:
            raise ValueError(f"max_context must be >= 16, got {self.max_context}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}"
            )
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")
        recipe = self.recipe  # validates block size, algo and per-tensor precisions before any work starts
        object.__setattr__(self, "target_cpu", targets.resolve(self.target_cpu))
        if self.algo == GGUF_EXACT and self.target_cpu == "a72":
            raise ValueError(
                "a GGUF's 5-, 6- and 8-bit blocks (Q5_0, Q6_K, Q8_0, ...) stay 8-bit in an exact package, "
                "which runs a float32 fallback on the a72 target (no dot products): use the small recipe "
                "(--recipe small) there"
            )
        targets.check(self.target_cpu, recipe.int8_matrices())

    @property
    def recipe(self) -> Recipe:
        if self.algo == GGUF_EXACT:
            # A GGUF's own quantized tensors go in unchanged (export/gguf_exact.py); this recipe is for
            # the tensors of a type with no exact map: int8, the closest to their values uncalibrated.
            return make_recipe("int8", 32, False, "kquant", None, None, False)
        return make_recipe(
            self.precision,
            self.block_size,
            self.symmetric,
            self.algo,
            self.embeddings,
            self.lm_head,
            self.mixed,
            self.block_sizes,
        )

    def recipe_for(self, config: QwenConfig) -> Recipe:
        """A tied checkpoint has one vocabulary matrix: it takes lm_head's scheme unless told otherwise."""
        recipe = self.recipe
        if config.tie_word_embeddings and self.embeddings is None:
            return replace(recipe, embeddings=recipe.lm_head)
        return recipe

    @property
    def needs_calibration(self) -> bool:
        return self.precision in ("int4", "int8") and self.algo in ("imatrix", "gptq")

    @property
    def needs_hessians(self) -> bool:
        """GPTQ needs each layer's whole X^T X; imatrix only its diagonal."""
        return self.needs_calibration and self.algo == "gptq"

    def for_model(self, config: QwenConfig) -> ExportOptions:
        """Resolve the default context and check it against the model's maximum."""
        limit = config.max_position_embeddings
        if self.max_context is None:
            return replace(self, max_context=min(DEFAULT_MAX_CONTEXT, limit))
        if self.max_context > limit:
            raise ValueError(
                f"max_context {self.max_context} exceeds the model's max_position_embeddings {limit}"
            )
        return self


def default_options(precision: str = "int4", target_cpu: str = targets.ANY) -> ExportOptions:
    """What `edge-qwen pull` and a bare `edge-qwen export` produce for each precision and target CPU
    from a float checkpoint (a quantized GGUF's INT4 default is its exact import: recipe_options).

    The INT4 default is chosen by measurement on the held-out suite: see docs/quantization.md.
    """
    if precision == "int4":
        if targets.resolve(target_cpu) == "a72":  # no int8 dot products: no int8 matrices
            return replace(recipe_options("small"), target_cpu=target_cpu)
        return calibrated_options(target_cpu)
    if precision == "int8":
        return ExportOptions(precision="int8", algo="kquant", block_size=32, target_cpu=target_cpu)
    return ExportOptions(precision=precision, target_cpu=target_cpu)


def calibrated_options(target_cpu: str = targets.ANY) -> ExportOptions:
    """The calibrated INT4 recipe: GPTQ calibrated on the multi-domain mix, asymmetric, block 32 with
    lm_head (and the tied embedding) at 64, int4 lm_head, qkv_proj and down_proj at int8 in the first
    and last sixth of the layers. On the held-out suite's eight domains: KLD below onnxruntime-genai's
    best INT4 recipe (k_quant_mixed) on every one, top-1 within a point of it, at 0.48x the size of its
    INT4 default, decoding at 0.94x the layout without int8 (docs/quantization.md)."""
    return ExportOptions(
        precision="int4",
        algo="gptq",
        block_size=32,
        lm_head="int4",
        mixed=True,
        block_sizes=(("lm_head", 64),),
        calibration="auto",
        target_cpu=target_cpu,
    )


RECIPES = ("default", "calibrated", "small", "exact")


def recipe_options(
    recipe: str, precision: str = "int4", target_cpu: str = targets.ANY, gguf: bool = False
) -> ExportOptions:
    """A named recipe for a source (`gguf`: a .gguf file).

    - `calibrated` (INT4): GPTQ on the multi-domain mix with int8 edge layers, the best INT4 quality
      per byte and the fastest decode, after minutes of calibration;
    - `small` (INT4): no int8 matrix and gate_up_proj at block 64, 9% smaller, more KLD on every domain
      of the held-out suite; the default on a Raspberry Pi 4 (a72);
    - `exact` (INT4, a GGUF source): the GGUF's own quantized blocks carried over unchanged, in
      seconds (export/gguf_exact.py);
    - `default`: `exact` for a GGUF source at INT4 (outside the a72), else default_options. A float GGUF
      asked for `exact` is exported with default_options (gguf_exact.options_for).

    docs/quantization.md has the measurements behind each choice."""
    if recipe == "default":
        if gguf and precision == "int4" and targets.resolve(target_cpu) != "a72":
            return recipe_options("exact", precision, target_cpu)
        return default_options(precision, target_cpu)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if precision != "int4":
        raise ValueError(
            f"the {recipe} recipe is an INT4 recipe: use it with precision int4, not {precision}"
        )
    if recipe == "exact":
        return ExportOptions(precision="int4", algo=GGUF_EXACT, target_cpu=target_cpu)
    if recipe == "calibrated":
        return calibrated_options(target_cpu)
    return ExportOptions(
        precision="int4",
        algo="gptq",
        block_size=32,
        lm_head="int4",
        mixed=False,
        block_sizes=(("gate_up_proj", 64), ("lm_head", 64)),
        calibration="auto",
        target_cpu=target_cpu,
    )
