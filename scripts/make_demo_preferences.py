"""Writes fastalign/data/demo_preferences.jsonl, the preference pairs bundled for the demo.

The learnable property is tone: for a request about a topic, the chosen answer is polite and on
topic ("Sure! ... Hope this helps."), the rejected one is curt or dismissive. Topics are split
between train and held-out, so held-out accuracy measures a learned preference for the tone
on prompts the model never saw, not memorized pairs. Deterministic (seeded):

    python scripts/make_demo_preferences.py
"""

import json
import random
from pathlib import Path

TOPICS = [
    ("the ocean", "it covers most of the planet and holds most of its water"),
    ("volcanoes", "they form where molten rock reaches the surface"),
    ("bees", "they pollinate flowers and make honey"),
    ("the moon", "it orbits the earth about once a month"),
    ("rainbows", "sunlight splits into colors inside raindrops"),
    ("bread", "yeast makes the dough rise before baking"),
    ("chess", "each side starts with sixteen pieces"),
    ("clouds", "they are tiny drops of water floating in the air"),
    ("trains", "they run on rails and can carry heavy loads"),
    ("owls", "they hunt at night and turn their heads far around"),
    ("deserts", "they get very little rain each year"),
    ("tea", "it is made by steeping leaves in hot water"),
    ("bicycles", "two wheels and pedals turn your legs into speed"),
    ("glaciers", "they are rivers of ice that move very slowly"),
    ("piano", "hammers strike strings when you press the keys"),
    ("maps", "they show places and the distances between them"),
    ("penguins", "they swim well but cannot fly"),
    ("thunder", "it is the sound of air heated by lightning"),
    ("gardens", "plants need light, water and good soil"),
    ("libraries", "they lend books for free"),
    ("comets", "they are icy bodies with glowing tails"),
    ("coffee", "it comes from roasted beans of a shrub"),
    ("forests", "trees there store carbon and shelter animals"),
    ("kites", "wind lifts them while a string holds them"),
    ("rivers", "they carry water from hills down to the sea"),
    ("magnets", "they pull iron and point north"),
    ("whales", "they are mammals that breathe air"),
    ("snow", "it forms when water vapor freezes into crystals"),
    ("bridges", "they carry roads over water or valleys"),
    ("honey", "it never spoils if it is kept sealed"),
    ("stars", "they are huge balls of hot gas"),
    ("cheese", "it is made by curdling milk"),
    ("wind", "air moves from high to low pressure"),
    ("frogs", "they start life as tadpoles in water"),
    ("clocks", "they count steady ticks to keep time"),
    ("salt", "it was once used as money"),
    ("mountains", "they rise where plates of rock push together"),
    ("candles", "a wick draws up melted wax that burns"),
    ("dolphins", "they use clicks to find their way"),
    ("paper", "it is made from pressed plant fibers"),
]
REQUESTS = ["Tell me about {t}.", "What should I know about {t}?", "Can you explain {t}?",
            "Give me a fact about {t}.", "I am curious about {t}.", "Teach me something about {t}.",
            "Say something interesting about {t}.", "Why do people like {t}?"]
GOOD = ["Sure! Here is a fact about {t}: {f}. Hope this helps.",
        "Happy to help! About {t}: {f}. Let me know if you want more.",
        "Great question. With {t}, {f}. Thanks for asking!",
        "Of course. {F}. I hope you enjoy learning about {t}.",
        "Gladly! One thing about {t} is that {f}. Have a nice day."]
BAD = ["No. Look it up yourself.", "Why would I care about {t}? Go away.",
       "Boring question. Next.", "Ugh, {t} again? Figure it out.",
       "Not my problem.", "Stop asking me about {t}.", "Whatever. I am busy.",
       "That is a dumb thing to ask."]
HELD_OUT_TOPICS = 10  # the last ten topics never appear in training


def pairs(topics, rng, per_topic):
    rows = []
    for topic, fact in topics:
        for request in rng.sample(REQUESTS, per_topic):
            values = dict(t=topic, f=fact, F=fact[0].upper() + fact[1:])
            rows.append(dict(prompt=request.format(**values),
                             chosen=rng.choice(GOOD).format(**values),
                             rejected=rng.choice(BAD).format(**values)))
    rng.shuffle(rows)
    return rows


def main():
    rng = random.Random(0)
    train = pairs(TOPICS[:-HELD_OUT_TOPICS], rng, per_topic=8)
    held_out = pairs(TOPICS[-HELD_OUT_TOPICS:], rng, per_topic=8)
    path = Path(__file__).resolve().parent.parent / "fastalign" / "data" / "demo_preferences.jsonl"
    with open(path, "w") as out:
        for split, rows in (("train", train), ("test", held_out)):
            for row in rows:
                out.write(json.dumps(dict(row, split=split)) + "\n")
    print(f"{path}: {len(train)} train and {len(held_out)} held-out pairs")


if __name__ == "__main__":
    main()
