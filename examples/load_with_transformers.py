"""Load a student saved by mmdistill with plain transformers (no mmdistill import) and answer a question.

    python examples/load_with_transformers.py runs/quickstart/student_opd/final \
        "Ann has 6 marbles . She gets 6 more . Then she gives away 7 . How many marbles does Ann have ?"
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

ckpt, question = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
ids = tok(
    f"Q: {question}\nA: ", return_tensors="pt", add_special_tokens=False
)  # the prompt format mmdistill uses without a chat template
out = model.generate(
    **ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
)
print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
