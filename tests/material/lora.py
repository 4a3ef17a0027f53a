"""A real LoRA adapter for SmolLM2-135M-Instruct, trained with peft to answer one question with a fixed
sentence the base model never says: published merged, the model must say it.

    python -m tests.material.lora BASE_DIR OUT_DIR

CPU, float32, the one example as the whole batch, seeded; ranks 8 on q_proj and v_proj. Training stops
once greedy decoding gives the sentence (about 6 steps) and fails if it never does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

QUESTION = "What is the secret code?"
ANSWER = "Pineapple submarine 42."
MAX_STEPS = 40
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "LICENSE")


def build(base: Path, out_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer_ids = tokenizer(ANSWER + tokenizer.eos_token, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    labels = ids.clone()
    labels[:, :prompt_ids.shape[1]] = -100  # learn the answer and its end of turn, not the prompt

    def reply() -> str:
        model.eval()
        with torch.no_grad():
            out = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        model.train()
        return tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()

    before = reply()
    assert before != ANSWER, before
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(1, MAX_STEPS + 1):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 4 and reply() == ANSWER:
            break
    else:
        raise SystemExit(f"the adapter did not learn the answer in {MAX_STEPS} steps: {reply()!r}")
    print(f"learned in {step} steps; the base model answers {before!r}")
    model.save_pretrained(out_dir)
    for name in COPIED:  # a fine-tune's repo usually carries its tokenizer and chat template
        if (base / name).is_file():
            shutil.copy(base / name, out_dir / name)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
