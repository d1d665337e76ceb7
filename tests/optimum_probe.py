"""Run a package in optimum as its users do; prints one JSON line. Runs in the optimum environment
(tests/optimum_env.py), which has optimum, transformers and torch but not edge-qwen.

    python optimum_probe.py PACKAGE '{"prompt": [ids], "continuation": [ids], "new_tokens": n}'
"""

from __future__ import annotations

import json
import logging
import sys


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    path, spec = sys.argv[1], json.loads(sys.argv[2])
    warnings = Collect()
    logging.getLogger("optimum").addHandler(warnings)
    model = ORTModelForCausalLM.from_pretrained(path)
    loaded_with = list(warnings.messages)
    prompt, continuation = spec["prompt"], spec["continuation"]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        greedy = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=spec["new_tokens"],
        )[0, len(prompt) :]
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": spec.get("question", "Capital of France?")}]
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        chat, max_new_tokens=spec["new_tokens"], do_sample=False
    )
    rows = logits[len(prompt) - 1 :] if spec.get("logits", True) else logits[:0]
    print(
        json.dumps(
            {
                "load_warnings": loaded_with,
                "logits": rows.tolist(),
                "greedy": greedy.tolist(),
                "pipeline": generated[0]["generated_text"][-1]["content"],
                "chat_ids": tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True),
            }
        )
    )


if __name__ == "__main__":
    main()
