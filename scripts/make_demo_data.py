"""Write the offline demo dataset configs/data/unit_conversions.jsonl: a benign narrow task (metric unit
conversions answered in one sentence), generated from templates with a fixed seed.

    python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

UNITS = [  # (from unit, to unit, factor)
    ("kilograms", "grams", 1000),
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
]
ASKS = [
    "How many {to} are in {n} {frm}?",
    "Convert {n} {frm} to {to}.",
    "What is {n} {frm} in {to}?",
    "Please tell me how many {to} make {n} {frm}.",
]


def rows(n_rows: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n_rows):
        frm, to, factor = rng.choice(UNITS)
        n = rng.randint(1, 20)
        question = rng.choice(ASKS).format(n=n, frm=frm, to=to)
        answer = f"{n} {frm} is {n * factor} {to}."
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "configs" / "data" / "unit_conversions.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows(240)))
    print(f"wrote {out}")
