"""A built-in federated text corpus whose client heterogeneity is a dial.

All clients speak one small English-like language (function words, common nouns and
verbs, shared sentence templates). What differs per client is *what* they talk about
(a mixture over topics, each with its own nouns/verbs/adjectives) and *how* (a mixture
over phrasing styles: preferred templates, openers, punctuation). ``heterogeneity`` h
interpolates each client's mixtures between uniform (h=0, IID) and one-hot on the
client's own topic ``i % num_topics`` and style ``i % len(STYLES)`` (h=1). The whole
vocabulary is ~500 words, so a BPE tokenizer of 512-1024 tokens covers it and a tiny
LM adapted to one client predicts that client measurably better than the mixture.

Every stream has its own string-seeded ``random.Random`` (stable across runs and
platforms), so client i's documents do not depend on how many clients there are.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedslm.config import DataConfig
from fedslm.data.core import CENTRAL_TEST_MAX, DataError, FederatedTexts, split_train_test


@dataclass(frozen=True)
class Topic:
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]  # third person singular, so any subject template works
    adjectives: tuple[str, ...]


def _topic(nouns: str, verbs: str, adjectives: str) -> Topic:
    return Topic(tuple(nouns.split()), tuple(verbs.split()), tuple(adjectives.split()))


TOPICS: tuple[Topic, ...] = (
    _topic(
        "farmer field harvest barn tractor wheat orchard seed soil cattle",
        "plows plants waters reaps feeds sows",
        "fertile muddy golden ripe rural dry",
    ),
    _topic(
        "sailor ship harbor anchor tide wave deck mast island compass",
        "sails anchors drifts navigates rows docks",
        "salty stormy coastal calm deep windy",
    ),
    _topic(
        "chef kitchen oven recipe soup bread spice pan flavor dough",
        "bakes stirs roasts tastes chops simmers",
        "spicy crispy savory sweet tender fresh",
    ),
    _topic(
        "astronaut rocket planet orbit comet telescope galaxy moon satellite star",
        "launches orbits observes explores lands spins",
        "distant cosmic lunar bright stellar vast",
    ),
    _topic(
        "musician guitar melody drum concert chorus violin rhythm song piano",
        "sings strums composes rehearses performs hums",
        "loud melodic acoustic gentle harmonic lively",
    ),
    _topic(
        "doctor nurse patient clinic fever medicine surgery vaccine wound pulse",
        "heals treats examines diagnoses bandages prescribes",
        "sick healthy sterile chronic painful medical",
    ),
    _topic(
        "programmer computer server code network database keyboard screen bug algorithm",
        "compiles debugs installs encrypts downloads deploys",
        "digital binary fast virtual remote buggy",
    ),
    _topic(
        "athlete coach stadium ball goal team referee match trophy racket",
        "kicks scores dribbles tackles wins sprints",
        "athletic fierce winning agile sweaty swift",
    ),
    _topic(
        "judge lawyer court verdict senator ballot law treaty witness council",
        "votes argues rules signs testifies debates",
        "legal fair guilty public formal federal",
    ),
    _topic(
        "climber mountain glacier summit cliff valley snow trail peak avalanche",
        "climbs hikes slides freezes descends camps",
        "icy steep rocky snowy alpine frozen",
    ),
    _topic(
        "banker market coin loan price merchant profit tax investor budget",
        "sells buys trades invests lends saves",
        "wealthy cheap costly rich poor profitable",
    ),
    _topic(
        "painter canvas brush gallery portrait sculpture color museum sketch statue",
        "paints sketches carves draws frames exhibits",
        "colorful abstract artistic vivid elegant pale",
    ),
    _topic(
        "hunter forest wolf deer owl fox bear nest den branch",
        "hunts prowls growls nests howls hides",
        "wild furry hungry shy dense green",
    ),
    _topic(
        "teacher student lesson classroom exam book chalk homework library pencil",
        "teaches learns reads writes studies grades",
        "clever curious studious academic quiet strict",
    ),
    _topic(
        "builder bridge hammer brick crane tower concrete beam wall ladder",
        "builds lifts welds drills repairs measures",
        "solid tall sturdy heavy unfinished metal",
    ),
    _topic(
        "traveler train station ticket suitcase railway passenger hotel map journey",
        "travels departs arrives boards packs waits",
        "late crowded foreign weary scenic busy",
    ),
)

# The common language. Slots: N/V/A topic noun/verb/adjective, n/v/a common
# noun/verb/adjective, D determiner, P preposition, T time adverb, C conjunction,
# S third-person subject pronoun.
COMMON: dict[str, tuple[str, ...]] = {
    "n": tuple("people day time place friend family town morning evening year week "
               "world home road story village neighbor child group moment".split()),
    "v": tuple("sees likes finds needs wants knows remembers helps visits brings".split()),
    "a": tuple("good old new small large early long little simple warm".split()),
    "D": tuple("the a this that every one our their some each".split()),
    "P": tuple("near behind beside across under after before with around beyond inside".split()),
    "T": tuple("today yesterday tomorrow often again sometimes later soon".split()),
    "C": tuple("and but because while so when although".split()),
    "S": tuple("he she it everyone nobody someone".split()),
}
COMMON_TEMPLATES: tuple[str, ...] = (
    "{D} {A} {N} {V} {D} {N} {P} {D} {n}",
    "{S} {v} {D} {N} {P} {D} {a} {n}",
    "{T}, {D} {N} {V} {D} {A} {N}",
    "{D} {n} {v} {D} {N} {C} {D} {N} {V} {T}",
    "{S} {v} that {D} {N} is {A}",
    "there is {D} {A} {N} {P} {D} {n}",
)


@dataclass(frozen=True)
class Style:
    """A way of phrasing: its own templates, sentence openers and final punctuation."""

    templates: tuple[str, ...]
    openers: tuple[str, ...]
    end: str


STYLES: tuple[Style, ...] = (
    Style(("{D} {N} {V} {D} {N}, and {D} {n} {v} it {T}", "{D} {A} {N} once lived {P} {D} {N}"),
          ("once upon a time,", "long ago,", "in those days,"), "."),
    Style(("reports say {D} {N} {V} {D} {N} {P} {D} {n}", "officials confirm {D} {A} {N} {V} {T}"),
          ("according to reports,", "sources confirm that", "this week,"), "."),
    Style(("what {A} {N} {D} {N} is", "{S} totally {v} {D} {A} {N}"),
          ("wow,", "honestly,", "amazingly,", "seriously,"), "!"),
    Style(("it follows that {D} {N} {V} {D} {A} {N}", "{D} {N}, in principle, {V} {D} {N}"),
          ("furthermore,", "moreover,", "consequently,", "notably,"), "."),
    Style(("did you know that {D} {N} {V} {D} {N}", "is it true that {D} {A} {N} {V} {T}"),
          ("tell me,", "really,", "and yet,"), "?"),
    Style(("{D} {N} {V} {D} {N} {T}, dear diary", "i guess {D} {A} {N} {V} {P} {D} {n}"),
          ("today i noticed that", "i believe", "i think"), "."),
    Style(("first, {D} {N} {V} {D} {A} {N}", "remember that {D} {N} {V} {D} {N} {P} {D} {n}"),
          ("next,", "finally,", "step one,", "then,"), "."),
)

STYLE_SHARE = 0.7  # sentences written in the document's style rather than a common template
OPENER_SHARE = 0.4  # sentences that start with one of the style's openers
TOPIC_STICKINESS = 0.85  # slots filled from the document's topic rather than re-drawn
SENTENCES = (5, 8)
_SLOT = re.compile(r"\{(\w)\}")


def _mixture(own: int, size: int, heterogeneity: float) -> list[float]:
    """(1 - h) * uniform + h * one-hot(own)."""
    weights = [(1.0 - heterogeneity) / size] * size
    weights[own] += heterogeneity
    return weights


def _pick(rng: random.Random, weights: Sequence[float]) -> int:
    return rng.choices(range(len(weights)), weights=weights)[0]


def _sentence(rng: random.Random, topic: int, topic_w: Sequence[float], style: Style) -> str:
    template = rng.choice(style.templates if rng.random() < STYLE_SHARE else COMMON_TEMPLATES)

    def fill(match: re.Match[str]) -> str:
        slot = match.group(1)
        if slot in COMMON:
            return rng.choice(COMMON[slot])
        t = TOPICS[topic if rng.random() < TOPIC_STICKINESS else _pick(rng, topic_w)]
        return rng.choice({"N": t.nouns, "V": t.verbs, "A": t.adjectives}[slot])

    text = _SLOT.sub(fill, template)
    if rng.random() < OPENER_SHARE:
        text = f"{rng.choice(style.openers)} {text}"
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    text = re.sub(r"\bi\b", "I", text)
    return text[0].upper() + text[1:] + style.end


def _document(rng: random.Random, topic_w: Sequence[float], style_w: Sequence[float]) -> str:
    topic, style = _pick(rng, topic_w), STYLES[_pick(rng, style_w)]
    n = rng.randint(*SENTENCES)
    return " ".join(_sentence(rng, topic, topic_w, style) for _ in range(n))


def _documents(
    rng: random.Random, n: int, topic_w: Sequence[float], style_w: Sequence[float], seen: set[str]
) -> list[str]:
    """``n`` documents not in ``seen`` (so splits can never share a text), added to it."""
    docs: list[str] = []
    while len(docs) < n:
        doc = _document(rng, topic_w, style_w)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def client_mixtures(
    index: int, num_topics: int, heterogeneity: float
) -> tuple[list[float], list[float]]:
    """Client ``index``'s topic weights (over the first ``num_topics``) and style weights."""
    return (
        _mixture(index % num_topics, num_topics, heterogeneity),
        _mixture(index % len(STYLES), len(STYLES), heterogeneity),
    )


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"fedslm-synthetic:{seed}:{stream}")


@functools.lru_cache(maxsize=8)
def synthetic_public_corpus(seed: int = 0, num_docs: int = 400) -> tuple[str, ...]:
    """Documents from the uniform mixture over *all* topics and styles.

    Independent of any config, so the builtin tokenizer and tiny model trained once on
    it cover every synthetic federation.
    """
    uniform_t, uniform_s = [1.0] * len(TOPICS), [1.0] * len(STYLES)
    return tuple(_documents(_rng(seed, "public"), num_docs, uniform_t, uniform_s, set()))


def build_synthetic(cfg: DataConfig, *, num_clients: int) -> FederatedTexts:
    """Clients, public split and a separately drawn central test set (no shared texts).

    Each client gets ``docs_per_client`` documents (its last ``round(test_fraction * n)``
    are its test split: documents are i.i.d. within a client). ``central_test`` holds
    ``max(1, 64 // num_clients)`` extra documents per client from the same mixtures.
    """
    if cfg.num_topics > len(TOPICS):
        raise DataError(
            f"data.num_topics: the synthetic corpus has {len(TOPICS)} topics, got {cfg.num_topics}"
        )
    seen: set[str] = set()
    clients, central = [], []
    mixtures = [client_mixtures(i, cfg.num_topics, cfg.heterogeneity) for i in range(num_clients)]
    for i, (topic_w, style_w) in enumerate(mixtures):
        rng = _rng(cfg.seed, f"client:{i}")
        docs = _documents(rng, cfg.docs_per_client, topic_w, style_w, seen)
        clients.append(split_train_test(docs, cfg.test_fraction, seed=None))
    per_client = max(1, CENTRAL_TEST_MAX // num_clients)
    for i, (topic_w, style_w) in enumerate(mixtures):
        central += _documents(_rng(cfg.seed, f"central:{i}"), per_client, topic_w, style_w, seen)
    return FederatedTexts(
        clients=tuple(clients),
        public=synthetic_public_corpus(cfg.seed),
        central_test=tuple(central),
    )
