#!/usr/bin/env python3
"""The addition task of the SFT and GRPO demos: "a+b=" -> "c\n" with a, b in 0..99, as bytes
(token id = byte, the character-level tokenizer of `dsc train grpo`'s text prompts).

    python3 specs/recipes/data/make_addition.py      # rewrites the files below, deterministically

- addition_train.jsonl    SFT: {"input_ids": [...], "loss_mask": [...]}, loss on the answer only
- addition_prompts.jsonl  GRPO: {"prompt": "a+b=", "answer": "c"}
- addition_heldout.jsonl  300 held-out problems, no (a, b) pair of which is in the two above
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def main(seed=0, sft=2000, prompts=2000, heldout=300):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    held, rest = pairs[:heldout], pairs[heldout:]
    with open(os.path.join(HERE, "addition_train.jsonl"), "w") as f:
        for a, b in rng.sample(rest, sft):
            q, ans = f"{a}+{b}=", f"{a + b}\n"
            ids = list((q + ans).encode())
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * len(q) + [1] * len(ans)}) + "\n")
    for name, chosen in (("addition_prompts.jsonl", rng.sample(rest, prompts)), ("addition_heldout.jsonl", held)):
        with open(os.path.join(HERE, name), "w") as f:
            for a, b in chosen:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
