"""Quantization recipes: which precision each weight gets.

A recipe names a scheme for the transformer body, for the embedding table and for lm_head, plus an
optional set of sensitive tensors kept at 8 bits (llama.cpp's Q4_K_M idea: attention values and
down_proj in the first and last layers matter most to small models).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_qwen.quant import check_scheme

FLOAT_DTYPES = ("fp32", "fp16")
# imatrix: kquant weighted by calibration activations; gptq: error compensation through their Hessian.
ALGOS = ("rtn", "kquant", "imatrix", "gptq")
CALIBRATED = ("imatrix", "gptq")


@dataclass(frozen=True)
class Scheme:
    """How one weight is stored: a float dtype, or block-quantized bits."""

    dtype: str  # "fp32" | "fp16" | "int4" | "int8"
    block_size: int = 32
    symmetric: bool = False
    algo: str = "rtn"

    def __post_init__(self) -> None:
        if self.dtype in FLOAT_DTYPES:
            return
        if self.dtype not in ("int4", "int8"):
            raise ValueError(f"precision must be one of fp32, fp16, int8, int4, got {self.dtype!r}")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        check_scheme(self.bits, self.block_size, "kquant" if self.algo in CALIBRATED else self.algo)

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int4", "int8")

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8}.get(self.dtype, 0)

    def describe(self) -> str:
        if not self.quantized:
            return self.dtype
        zp = "sym" if self.symmetric else "asym"
        return f"{self.dtype} b{self.block_size} {zp} {self.algo}"


@dataclass(frozen=True)
class Recipe:
    """Per-tensor precision for a whole model."""

    body: Scheme
    embeddings: Scheme
    lm_head: Scheme
    sensitive: Scheme | None = None  # for sensitive_tensors(); None: no mixing
    body_blocks: tuple[tuple[str, int], ...] = ()  # (weight, block size): body weights off body's size

    def scheme_for(self, weight: str, layer: int, num_layers: int) -> Scheme:
        """The scheme of a packed weight such as 'qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'."""
        if self.sensitive is not None and is_sensitive(weight, layer, num_layers):
            return self.sensitive
        block = dict(self.body_blocks).get(weight)
        return self.body if block is None else replace(self.body, block_size=block)

    def int8_matrices(self) -> list[str]:
        """The parts whose MatMulNBits weights are 8-bit (the embedding table is gathered, not multiplied)."""
        parts = [("body", self.body), ("lm_head", self.lm_head), ("sensitive tensors", self.sensitive)]
        return [name for name, scheme in parts if scheme is not None and scheme.dtype == "int8"]

    def to_dict(self) -> dict[str, str | None]:
        out = {
            "body": self.body.describe(),
            "embeddings": self.embeddings.describe(),
            "lm_head": self.lm_head.describe(),
            "sensitive (qkv_proj, down_proj of the first and last sixth of the layers)": (
                self.sensitive.describe() if self.sensitive else None
            ),
        }
        for weight, block in self.body_blocks:
            out[weight] = replace(self.body, block_size=block).describe()
        return out


def is_sensitive(weight: str, layer: int, num_layers: int) -> bool:
    """qkv (holds v_proj) and down_proj in the first and last sixth of the layers.

    A sixth (4 of 24 layers at 0.5B) rather than Q4_K_M's eighth: on the real 0.5B it brought prose
    top-1 from 89.6% to 90.3% for 5 MB, within the size budget (docs/quantization.md).
    """
    edge = max(1, num_layers // 6)
    return weight in ("qkv_proj", "down_proj") and (layer < edge or layer >= num_layers - edge)


BODY_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def make_recipe(
    precision: str,
    block_size: int,
    symmetric: bool,
    algo: str,
    embeddings: str | None,
    lm_head: str | None,
    mixed: bool,
    block_sizes: tuple[tuple[str, int], ...] = (),
) -> Recipe:
    """Build the recipe the export options describe; defaults for embeddings/lm_head follow precision.

    `block_sizes`: (weight, block size) pairs for weights that differ from `block_size`: any of
    BODY_WEIGHTS (int4 only: the int8 sensitive tensors keep `block_size`) and "lm_head" (quantized
    only; a tied embedding follows it).
    """
    body = Scheme(precision, block_size, symmetric, algo)
    if not body.quantized:
        if block_sizes:
            raise ValueError(f"per-tensor block sizes need a quantized precision, got {precision}")
        return Recipe(body, body, body)
    blocks = dict(block_sizes)
    unknown = sorted(set(blocks) - {*BODY_WEIGHTS, "lm_head"})
    if unknown:
        raise ValueError(f"block sizes are set per {', '.join(BODY_WEIGHTS)} or lm_head, got {unknown}")
    int8 = replace(body, dtype="int8")
    head = _scheme(lm_head, body, default=int8 if precision == "int4" else body)
    if "lm_head" in blocks:
        if not head.quantized:
            raise ValueError(f"lm_head is {head.dtype}: it has no block size")
        head = _with_block(head, "lm_head", blocks.pop("lm_head"))
    embed = _scheme(embeddings, body, default=body)
    body_blocks = tuple((w, blocks[w]) for w in BODY_WEIGHTS if w in blocks and blocks[w] != block_size)
    for weight, block in body_blocks:
        _with_block(body, weight, block)  # checks the size
    return Recipe(
        body, embed, head, sensitive=int8 if mixed and precision == "int4" else None, body_blocks=body_blocks
    )


def _scheme(dtype: str | None, body: Scheme, default: Scheme) -> Scheme:
    if dtype is None:
        return default
    return Scheme(dtype) if dtype in FLOAT_DTYPES else replace(body, dtype=dtype)


def _with_block(scheme: Scheme, weight: str, block: int) -> Scheme:
    try:
        return replace(scheme, block_size=block)
    except ValueError as e:
        raise ValueError(f"{weight}: {e}") from None
