"""The Qwen2 architecture configuration, validated once where it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SUPPORTED_ARCHITECTURE = "Qwen2ForCausalLM"


@dataclass(frozen=True)
class QwenConfig:
    """The shape of a Qwen2 decoder; field names follow Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"config {f.name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 16:
            # GroupQueryAttention's fused rotary needs head_size % 16 == 0.
            raise ValueError(f"head_dim must be a multiple of 16 for fused rotary, got {self.head_dim}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> QwenConfig:
        """Validate a Hugging Face config.json dict; refuse anything that is not Qwen2ForCausalLM."""
        archs = config.get("architectures") or [config.get("model_type", "unknown")]
        if archs != [SUPPORTED_ARCHITECTURE]:
            found = ", ".join(str(a) for a in archs)
            raise ValueError(
                f"unsupported architecture {found}: "
                f"edge-qwen exports {SUPPORTED_ARCHITECTURE} checkpoints only"
            )
        # transformers < 5 writes rope_theta (+ rope_scaling); transformers 5 nests both in rope_parameters.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported RoPE scaling {rope}: only plain RoPE is exported")
        rope_theta = config.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ValueError("config.json names no rope_theta (nor rope_parameters.rope_theta)")
        if config.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported; Qwen2.5 releases leave it off")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenConfig:
        """Read back what `to_dict` wrote (the manifest's `config`)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers and optimum accept for this shape."""
        return {
            "architectures": [SUPPORTED_ARCHITECTURE],
            "model_type": "qwen2",
            **self.to_dict(),
            "hidden_act": "silu",
            "use_sliding_window": False,
            "torch_dtype": "float32",
        }
