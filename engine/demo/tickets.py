"""The demo's task: classify customer-support tickets into 12 categories.

Tickets are written from per-category guides (what customers with that problem say, in many
phrasings) filled with products, order numbers, dates and amounts, wrapped in openers and
sign-offs that carry no label. Categories share vocabulary on purpose (a refund ticket talks
about charges, a login ticket about passwords), so the task needs more than one keyword.
Everything is drawn from a seeded RNG: the same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "billing": [
        "I was charged {amount} twice for order {order}",
        "my invoice for {month} shows {amount} but my plan costs less",
        "there is a charge of {amount} on my card that I do not recognise",
        "why did my subscription price go up to {amount} this {month}",
        "the invoice for order {order} lists the wrong company name and tax number",
        "my card was billed {amount} even though I switched to the free plan",
    ],
    "refund": [
        "I returned the {product} two weeks ago and still have not got my money back",
        "please refund the {amount} for order {order}, the item did not match the description",
        "I want my money back for the {product}, it stopped working after a day",
        "the refund for order {order} was approved but nothing reached my account",
        "can I get a refund instead of store credit for the {product}",
        "you promised a refund of {amount} on {date} and it has not arrived",
    ],
    "shipping delay": [
        "my order {order} was supposed to arrive on {date} and it is still not here",
        "tracking for the {product} has not moved in six days",
        "the parcel with order {order} says out for delivery since {date}",
        "where is my {product}? it shipped on {date} and nothing since",
        "delivery of order {order} keeps getting pushed back",
        "the courier says the package with my {product} is delayed again",
    ],
    "damaged item": [
        "the {product} arrived with a cracked screen",
        "the box for order {order} was crushed and the {product} inside is broken",
        "my {product} came scratched and one part is bent",
        "the {product} was leaking when I opened the package",
        "half of order {order} arrived smashed",
        "the {product} I received has a dent and does not close properly",
    ],
    "account access": [
        "I cannot log in, it says my account is locked",
        "the two-factor code never arrives so I am stuck at the login page",
        "my account was disabled and I do not know why",
        "I lost access to the email on my account and cannot sign in",
        "the app logs me out every few minutes and will not let me back in",
        "someone else seems to have signed into my account from another country",
    ],
    "password reset": [
        "the password reset link in the email has expired",
        "I asked for a password reset three times and never got the email",
        "the reset page says my new password is invalid no matter what I type",
        "how do I change my password, I forgot the old one",
        "the password reset link opens a blank page",
        "after resetting my password the old one still works, is that right",
    ],
    "technical bug": [
        "the app crashes every time I open the {feature} screen",
        "the {feature} page shows an error 500 since the last update",
        "when I tap save on {feature} nothing happens",
        "the {feature} totals are wrong after the update on {date}",
        "the website freezes when I upload a file in {feature}",
        "search returns no results even for products I can see in {feature}",
    ],
    "feature request": [
        "it would be great if {feature} could export to a spreadsheet",
        "please add a dark mode to {feature}",
        "could you let us share {feature} with the rest of the team",
        "I would love a way to schedule reports in {feature}",
        "can you add support for more currencies in {feature}",
        "please let me filter {feature} by date",
    ],
    "cancellation": [
        "I want to cancel my subscription at the end of this {month}",
        "please close my account and stop all future payments",
        "how do I cancel my membership, I cannot find the option",
        "cancel my plan, we no longer need the service",
        "I would like to end my contract before it renews on {date}",
        "stop my subscription, I am moving to another provider",
    ],
    "order change": [
        "can I change the delivery address for order {order} before it ships",
        "I ordered the wrong size of {product}, can you swap it before dispatch",
        "please add a second {product} to order {order}",
        "I need to change the colour of the {product} in order {order}",
        "can you remove the {product} from my order, it has not shipped yet",
        "please update the delivery date of order {order} to {date}",
    ],
    "product question": [
        "does the {product} work with a 110 volt outlet",
        "what is the warranty on the {product}",
        "is the {product} waterproof",
        "can the {product} be used by children",
        "what are the dimensions of the {product}",
        "does the {product} come with batteries or do I need to buy them",
    ],
    "privacy": [
        "please delete all the personal data you hold about me",
        "I want a copy of all the data you have on my account",
        "why are you sharing my email with third parties",
        "how long do you keep my payment details",
        "please stop using my data for marketing",
        "I did not consent to being tracked, remove my information",
    ],
}

OPENERS = ["Hello,", "Hi there,", "Hi team,", "Good morning,", "Dear support,", "Hey,", "", "",
           "To whom it may concern,"]
CLOSERS = ["Thanks.", "Thank you!", "Please help.", "Regards, {name}", "Cheers, {name}", "", "",
           "Any update is welcome.", "This is urgent.", "Thanks in advance, {name}"]
DETAILS = ["I have been a customer for years.", "This is the second time this happens.",
           "I already tried the help page.", "My order number is {order}.", "I am writing from my phone.", "", "", "",
           "I contacted you on {date} too.", "It is really frustrating."]
PRODUCTS = ["blender", "desk lamp", "running shoes", "laptop stand", "coffee grinder", "backpack", "smart watch",
            "air purifier", "office chair", "kettle", "phone case", "yoga mat", "headphones", "toaster"]
FEATURES = ["reports", "dashboard", "invoices", "calendar", "inventory", "checkout", "settings", "analytics", "exports"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemi", "Luis"]

SYSTEM_PROMPT = "Classify the support ticket into exactly one category: " + ", ".join(CATEGORIES) + "."


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        amount=f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}", order=f"#{rng.randint(10000, 99999)}",
        month=rng.choice(MONTHS), date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", product=rng.choice(PRODUCTS),
        feature=rng.choice(FEATURES), name=rng.choice(NAMES))


def make_ticket(category: str, rng: random.Random) -> str:
    body = _fill(rng.choice(CATEGORIES[category]), rng)
    body = body[0].upper() + body[1:] + rng.choice([".", ".", "!", "?", "..."])
    parts = [_fill(rng.choice(OPENERS), rng), body, _fill(rng.choice(DETAILS), rng), _fill(rng.choice(CLOSERS), rng)]
    return " ".join(p for p in parts if p)


def make_example(category: str, rng: random.Random) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": make_ticket(category, rng)},
        {"role": "assistant", "content": category},
    ]}


def write_dataset(out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> dict[str, Path]:
    """train/validation/test JSONL files, categories balanced, order shuffled. The generator reuses
    phrasings, so a held-out ticket that nearly repeats a training one (the data gate's near-duplicate
    test) is drawn again: the held-out splits measure what was learned, not what was seen."""
    from ..data import Example
    from ..data_checks import NEAR_THRESHOLD, example_parts, jaccard, normalise, shingles, words_of

    def shingled(row):
        return shingles(words_of(normalise(example_parts(Example(line=0, messages=row["messages"]))[2])))

    sizes = sizes or {"train": 1200, "validation": 120, "test": 240}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(CATEGORIES)
    paths, seen = {}, []
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            row = make_example(names[i % len(names)], rng)
            while split != "train" and any(jaccard(shingled(row), s) >= NEAR_THRESHOLD for s in seen):
                row = make_example(names[i % len(names)], rng)
            rows.append(row)
        rng.shuffle(rows)
        if split == "train":
            seen = [shingled(r) for r in rows]
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def pretraining_text(seed: int = 1, n_tickets: int = 3000) -> list[str]:
    """Unlabelled ticket-like text and the bundled knowledge-base prose: language the base model
    learns before fine-tuning, without ever seeing a category label."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    texts = [make_ticket(rng.choice(names), rng) for _ in range(n_tickets)]
    corpus = (Path(__file__).with_name("corpus.txt")).read_text(encoding="utf-8")
    texts += [p.strip() for p in corpus.split("\n\n") if p.strip()]
    rng.shuffle(texts)
    return texts
