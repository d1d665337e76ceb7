"""edge-qwen's Python API in one script: one-shot generation, streaming, and a chat session.

    python examples/quickstart.py ./qwen05 [--provider cpu] [--threads N]

./qwen05 is a model package (`edge-qwen export path/to/Qwen2.5-0.5B-Instruct ./qwen05`).
"""

from __future__ import annotations

import argparse

import edge_qwen


def main() -> None:
    parser = argparse.ArgumentParser(description="edge-qwen quickstart")
    parser.add_argument("model", help="a model package folder")
    parser.add_argument("--provider", default="cpu", help="cpu, xnnpack, qnn, nnapi or coreml")
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    args = parser.parse_args()

    model = edge_qwen.load(args.model, provider=args.provider, threads=args.threads)
    print("providers:", ", ".join(model.providers))

    # One shot, greedy: the whole completion as a string.
    print(model.generate("What is the capital of France? Answer in one word.", max_tokens=16))

    # Streaming with sampling: pieces of text as soon as they are whole characters.
    config = edge_qwen.GenerationConfig(temperature=0.7, top_p=0.9, seed=1, max_tokens=48, stop=["\n\n"])
    for piece in model.stream("Describe the sea in one sentence, with an emoji.", config):
        print(piece.text, end="", flush=True)
    speed = f"{piece.decode_tokens_per_second:.1f} tok/s"
    print(f"\n[{piece.generated_tokens} tokens, {speed}, finish: {piece.finish_reason}]")

    # A chat session keeps its KV cache between turns: turn 2 prefills only what is new.
    chat = model.chat(system="You are a terse geography tutor.", max_tokens=32)
    for question in ["What is the capital of France?", "And of Italy?"]:
        print(f"> {question}\n{chat.send(question)}")
        stats = chat.last_stats
        assert stats is not None
        print(f"[prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} prompt tokens]")
    print(f"regenerated: {chat.regenerate(temperature=0.8, seed=2)}")


if __name__ == "__main__":
    main()
