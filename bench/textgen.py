"""Deterministic synthetic documents for the benchmarks (nothing is downloaded): a made-up regional
gazetteer with one paragraph per town, and questions whose answers are in the text."""

from __future__ import annotations

import random

_SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "va", "shi", "bel", "dun", "ar", "os", "qui", "sel", "mar", "ith"]
_GOODS = ["salt", "copper", "wool", "amber", "glass", "honey", "timber", "silk", "barley", "dyed cloth"]
_RIVERS = ["the Aldra", "the Vessen", "the Mirrow", "the Quell", "the Tarn", "the Oskel"]
_TRADES = ["weavers", "glassblowers", "ferrymen", "beekeepers", "millers", "smiths", "scribes"]


def _town(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def _paragraph(rng: random.Random, town: str) -> str:
    year, people = rng.randint(1100, 1890), rng.randint(300, 90000)
    good, river, trade = rng.choice(_GOODS), rng.choice(_RIVERS), rng.choice(_TRADES)
    mayor = _town(rng) + " " + _town(rng)
    return (
        f"The town of {town} lies on the banks of {river} and was founded in {year}. "
        f"Its {people} inhabitants trade mostly in {good}, which is carried downstream on flat barges "
        f"every spring once the ice has gone. The guild of {trade} is the oldest in {town}; its hall "
        f"stands beside the market square and its members elect the mayor, currently {mayor}. "
        f"Travellers note that the bridge of {town} was rebuilt in stone after the flood of {year + 97}, "
        f"and that the town keeps a small library of {rng.randint(200, 9000)} volumes."
    )


def document(seed: int, words: int) -> str:
    """About `words` words of gazetteer prose."""
    rng = random.Random(seed)
    parts: list[str] = []
    count = 0
    while count < words:
        p = _paragraph(rng, _town(rng))
        parts.append(p)
        count += len(p.split())
    return "\n\n".join(parts)


def gazetteer(seed: int, towns: int) -> tuple[str, list[str]]:
    """A document of `towns` paragraphs and one question per town (20-40 tokens each)."""
    rng = random.Random(seed)
    names = [_town(rng) for _ in range(towns)]
    text = "\n\n".join(_paragraph(rng, t) for t in names)
    forms = [
        "According to the gazetteer above, in which year was the town of {t} founded, and on which river does it lie?",
        "Reading the description of {t} in the document, how many inhabitants does the town have, and what do "
        "they trade?",
        "Which guild is the oldest in the town of {t}, and who is the current mayor elected by its members?",
        "How many volumes does the library of {t} keep, and when was the bridge of {t} rebuilt in stone?",
    ]
    return text, [forms[i % len(forms)].format(t=t) for i, t in enumerate(names)]
