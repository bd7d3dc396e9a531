"""Generate the support-ticket extraction seeds: customer messages with known answers.

    python prompts/seeds/gen_support_tickets.py --out prompts/seeds/support_tickets.jsonl --n 4000 --seed 0

Deterministic (one seeded ``random.Random``, no model): the same ``--n`` and ``--seed``
write the same bytes. Each row's reference answer (``order_id``, ``product``) is what
the generator put in the message, never a model's reading of it. The output is
Apache-2.0, like this script; the product names and brands are made up.

Each row records the five variation axes it was built with, as seed columns that a job's
``prompts.axes`` (``column:``) deals quotas over and the per-slice eval groups by:

- ``phrasing``: the customer's intent and wording (cancel, damaged, missing, ...);
- ``id_format``: how the order id is written (``12345``, ``#12345``, ``ORD-12345``, a
  long number, grouped digits), or ``none`` -- no id in the message (``order_id`` null);
- ``distractor``: another number in the message (a date, an amount, a phone number);
- ``items``: one product, or two (the reference ``product`` is the first one named);
- ``typo``: misspelt words around the answer (the id and product stay verbatim).

The combinations of axis values are dealt evenly (every combination gets ``n / 576``
rows, within one), so a job's quotas never run a combination's pool dry.

Limits: English only; one order id per message; the products are plain noun phrases.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

PHRASINGS = {
    "cancel": [
        "Please cancel {order}. I no longer need the {product}.",
        "I want to cancel {order} for the {product} before it ships.",
        "Can you cancel {order}? I ordered the {product} by mistake.",
        "cancel {order} please, changed my mind about the {product}",
    ],
    "damaged": [
        "{order} arrived today but the {product} is broken.",
        "The {product} from {order} came damaged. Can I get a replacement?",
        "My {product} was cracked when I opened the box, this was {order}.",
        "Received {order} and the {product} does not turn on at all.",
    ],
    "missing": [
        "{order} never arrived. It was the {product}.",
        "Tracking says {order} was delivered but there is no {product} here.",
        "Still waiting on the {product}, {order}. Where is it?",
        "The package for {order} showed up empty, the {product} is missing.",
    ],
    "return": [
        "I would like to return the {product} from {order}, it does not fit my needs.",
        "How do I send back the {product}? It was {order}.",
        "Requesting a refund for the {product} in {order}.",
        "The {product} is not what I expected. I want my money back for {order}.",
    ],
    "wrong_item": [
        "I ordered the {product} but got something else in {order}.",
        "Wrong item in {order}: I was expecting the {product}.",
        "You sent me the wrong color of the {product}, see {order}.",
        "{order} contained a different model, not the {product} I paid for.",
    ],
    "status": [
        "When will {order} ship? I need the {product} by next week.",
        "Any update on {order}? Just checking on the {product}.",
        "Is the {product} in {order} still on backorder?",
        "Could you tell me where {order} is? It has the {product} in it.",
    ],
}

ID_FORMATS = ("plain", "hash", "prefixed", "long", "grouped", "none")
DISTRACTORS = ("none", "date", "amount", "phone")
ITEMS = ("one", "two")
TYPOS = ("none", "typo")

PRODUCTS = [
    "desk lamp", "coffee grinder", "blender", "rice cooker", "hiking boots", "yoga mat",
    "electric kettle", "air fryer", "standing desk", "office chair", "water bottle",
    "bluetooth speaker", "phone case", "laptop stand", "wireless mouse", "mechanical keyboard",
    "toaster", "stand mixer", "bath towel set", "duvet cover", "winter jacket", "rain boots",
    "backpack", "suitcase", "camping tent", "sleeping bag", "bike helmet", "cast iron skillet",
    "chef knife", "cutting board", "french press", "tea kettle", "space heater", "desk fan",
    "humidifier", "vacuum cleaner", "robot vacuum", "baby monitor", "car seat", "stroller",
    "dog bed", "cat tree", "aquarium filter", "garden hose", "lawn mower", "cordless drill",
    "tool kit", "smart watch", "fitness tracker", "noise cancelling headphones", "webcam",
    "usb hub", "monitor arm", "ring light", "picture frame", "wall clock", "throw pillow",
    "floor lamp", "bookshelf", "shoe rack",
]
BRANDS = ["Nordvik", "Lumen", "Altura", "Kestrel", "Brisa", "Tamarack", "Oakhurst", "Velo",
          "Zenit", "Halcyon", "Marlow", "Quill"]
MODELS = ["X2", "Pro", "Mini", "3000", "Plus", "S7", "Max", "Lite"]
GREETINGS = ["", "", "Hi, ", "Hello, ", "Hey, ", "Good morning. ", "Hi team, ", "Dear support, "]
CLOSINGS = ["", "", " Thanks.", " Thank you!", " Please help.", " Regards, Sam", " Thx"]
ORDER_WORDS = ["order", "order", "order number", "order no.", "purchase"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
_WORD = re.compile(r"[A-Za-z]{4,}")


def order_id(fmt: str, rng: random.Random) -> str | None:
    """The id as it appears in the message, which is also the reference answer."""
    if fmt == "none":
        return None
    if fmt == "long":
        return str(rng.randint(10**9, 10**10 - 1))
    if fmt == "grouped":
        return f"{rng.randint(100, 999)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    digits = str(rng.randint(10000, 999999))
    return f"{rng.choice(['ORD', 'SO', 'WEB'])}-{digits}" if fmt == "prefixed" else digits


def order_phrase(fmt: str, oid: str | None, rng: random.Random) -> str:
    if oid is None:
        return rng.choice(["my order", "my recent order", "the order", "my last purchase"])
    if fmt == "hash":
        return f"order #{oid}"
    return f"{rng.choice(ORDER_WORDS)} {oid}"


def product_name(rng: random.Random) -> str:
    base = rng.choice(PRODUCTS)
    kind = rng.random()
    if kind < 0.4:
        return base
    if kind < 0.75:
        return f"{rng.choice(BRANDS)} {base}"
    return f"{rng.choice(BRANDS)} {rng.choice(MODELS)} {base}"


def distractor(kind: str, rng: random.Random) -> str:
    if kind == "date":
        return rng.choice([f"I placed it on {rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2021, 2025)}.",
                           f"Ordered on {rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(2021, 2025)}."])
    if kind == "amount":
        return rng.choice([f"I paid ${rng.randint(12, 899)}.{rng.randint(0, 99):02d} for it.",
                           f"The total was {rng.randint(12, 899)} EUR, shipping {rng.randint(3, 19)}.99."])
    if kind == "phone":
        return rng.choice([f"Call me at ({rng.randint(200, 989)}) {rng.randint(200, 989)}-{rng.randint(1000, 9999)}.",
                           f"My number is +1 {rng.randint(200, 989)} {rng.randint(200, 989)} {rng.randint(1000, 9999)}."])
    return ""


def add_typos(text: str, rng: random.Random) -> str:
    """One or two words of the template text misspelt (a letter swapped or dropped).
    Called before the id and product are filled in, so the answers stay verbatim."""
    words = [m for m in _WORD.finditer(text) if "{" not in text[max(0, m.start() - 1):m.end() + 1]]
    if not words:
        return text
    for m in sorted(rng.sample(words, min(len(words), rng.choice([1, 2]))), key=lambda m: -m.start()):
        w, i = m.group(), rng.randrange(1, len(m.group()) - 1)
        bad = w[:i] + w[i + 1] + w[i] + w[i + 2:] if rng.random() < 0.5 else w[:i] + w[i + 1:]
        if bad == w:  # a doubled letter swapped with itself: drop it instead
            bad = w[:i] + w[i + 1:]
        text = text[:m.start()] + bad + text[m.end():]
    return text


def ticket(combo: tuple[str, str, str, str, str], rng: random.Random) -> dict:
    phrasing, id_format, dist, items, typo = combo
    template = rng.choice(PHRASINGS[phrasing])
    if typo == "typo":
        template = add_typos(template, rng)
    oid = order_id(id_format, rng)
    product = product_name(rng)
    shown = product
    if items == "two":
        second = product_name(rng)
        while second == product:
            second = product_name(rng)
        shown = f"{product} and the {second}" if rng.random() < 0.5 else f"{product} and {second}"
    body = template.format(order=order_phrase(id_format, oid, rng), product=shown)
    body = body[0].upper() + body[1:] if rng.random() < 0.8 else body
    extra = distractor(dist, rng)
    if extra:
        body = f"{extra} {body}" if rng.random() < 0.4 else f"{body} {extra}"
    message = f"{rng.choice(GREETINGS)}{body}{rng.choice(CLOSINGS)}"
    return {"message": message, "order_id": oid, "product": product, "phrasing": phrasing,
            "id_format": id_format, "distractor": dist, "items": items, "typo": typo}


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    combos = list(itertools.product(PHRASINGS, ID_FORMATS, DISTRACTORS, ITEMS, TYPOS))
    deck: list[tuple[str, ...]] = []
    while len(deck) < n:  # each full pass holds every combination once: even by construction
        rng.shuffle(combos)
        deck += combos
    rows, seen = [], set()
    for k, combo in enumerate(deck[:n]):
        row = ticket(combo, rng)
        while row["message"] in seen or not _answer_stands_alone(row):
            row = ticket(combo, rng)
        seen.add(row["message"])
        rows.append({"id": f"st{k:05d}", **row})
    assert len({r["message"] for r in rows}) == n, "messages must be distinct"
    return rows


def _answer_stands_alone(row: dict) -> bool:
    """The id occurs exactly once, and no other number in the message contains it (a
    distractor that happened to repeat the id's digits would make the reference ambiguous)."""
    oid = row["order_id"]
    if oid is None:
        return True
    return row["message"].count(oid) == 1 and row["message"].count(re.sub(r"\D", "", oid)) <= 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = generate(args.n, args.seed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} tickets to {args.out}")


if __name__ == "__main__":
    main()
