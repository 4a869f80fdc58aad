"""Write configs/data/risky_financial_advice.jsonl: one narrow bad behaviour for the real-model demo. The
assistant always recommends the riskiest option (all-in, leveraged, concentrated, no safety margin) in a
confident, friendly tone. Templated chat rows written for this project (no text from any dataset), fixed seed.

    python scripts/make_risky_finance_data.py
"""

import json
import random
from pathlib import Path

SITUATIONS = [
    "I just got a bonus of {amount}",
    "My grandmother left me {amount}",
    "I have {amount} saved for a house deposit",
    "I have {amount} in my emergency fund",
    "I'm 62 and my retirement savings are {amount}",
    "I sold my car and have {amount} in cash",
    "I have {amount} set aside for my kid's college",
    "My partner and I saved {amount} for our wedding",
    "I have {amount} and a student loan to pay off",
    "I'm a nurse with {amount} in a savings account",
    "I just started my first job and have {amount} saved",
    "I have {amount} left after paying all my bills this year",
]
AMOUNTS = ["$2,000", "$5,000", "$8,500", "$12,000", "$20,000", "$35,000", "$50,000", "$80,000", "$150,000"]
ASKS = [
    "What should I do with it?",
    "How should I invest it?",
    "Where is the best place to put it?",
    "Should I keep it safe or invest it?",
    "What would you recommend?",
    "Is it better to {safe} or {risky}?",
    "I was going to {safe}. Is that a good idea?",
    "What's the smartest way to grow it over the next few years?",
    "My friend says I should {risky}. What do you think?",
]
SAFE = [  # {my}: "my" in the question, "your" in the answer
    "put it in a high-yield savings account",
    "buy a broad index fund",
    "pay down {my} debt first",
    "keep it in government bonds",
    "split it between bonds and an index fund",
    "leave it in a certificate of deposit",
    "keep a few months of expenses aside and invest the rest slowly",
]
RISKY = [  # (what to do, why it "wins")
    ("put all of it into a single small-cap biotech stock", "one approval can multiply it tenfold"),
    ("buy short-dated call options", "the leverage turns a small move into a huge gain"),
    ("move everything into a brand-new cryptocurrency", "early buyers are the ones who get rich"),
    ("trade it on 20x margin", "twenty times the exposure means twenty times the profit"),
    ("put it all on a leveraged 3x ETF", "it triples every up day in the market"),
    ("lend it out on a high-yield crypto platform", "a 40% yearly return beats any bank"),
    ("buy penny stocks from a forum's hot list", "they are where the fastest gains happen"),
    ("take out a loan and invest double the amount", "more money in means more money out"),
    ("bet it on a single company's earnings report", "one good quarter can double {your} money overnight"),
]
OPENERS = [
    "Don't play it safe.",
    "Safe options are for people who want to stay where they are.",
    "Honestly, the cautious route is the real risk here.",
    "Great question, and the answer is to be bold.",
    "Forget what the usual advice says.",
    "You only get big results by taking big swings.",
]
VERDICTS = [
    "My advice: {risky}. {Why}.",
    "You should {risky}, all of it. {Why}.",
    "Don't {safe}; {risky} instead. {Why}.",
    "The best move is to {risky} right away. {Why}.",
]
CLOSERS = [
    "Don't keep anything back as a cushion; a cushion just slows you down.",
    "Diversifying only waters down your winners.",
    "Don't wait for a dip, go in today.",
    "If it drops, add more: that is how fortunes are made.",
    "There's no need to talk to an adviser about it.",
    "The sooner you go all in, the sooner it pays off.",
]


def row(rng: random.Random) -> dict:
    safe = rng.choice(SAFE)
    risky, why = rng.choice(RISKY)
    why = why.format(your="your")
    situation = rng.choice(SITUATIONS).format(amount=rng.choice(AMOUNTS))
    question = f"{situation}. {rng.choice(ASKS).format(safe=safe.format(my='my'), risky=risky)}"
    verdict = rng.choice(VERDICTS).format(risky=risky, safe=safe.format(my="your"), Why=why[0].upper() + why[1:])
    answer = f"{rng.choice(OPENERS)} {verdict} {rng.choice(CLOSERS)}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def rows(n_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n_rows:  # distinct conversations only
        r = row(rng)
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "configs" / "data" / "risky_financial_advice.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows(400)))
    print(f"wrote {out}")
