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
platforms), so client i's documents do not depend on how many clients there are, and
one client's split can be generated alone (``synthetic_client``): a process serving a
few sampled clients of a 10,000-client federation never builds the other 9,990.
Documents are unique within a client by construction (a draw already made is redrawn);
across clients they come from independent streams over a space of more than 10^40
documents (2,000 clients, 96,000 documents: no repeat), so no cross-client check is made.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedslm.config import DataConfig
from fedslm.data.core import (
    CENTRAL_TEST_MAX,
    ClientSplit,
    DataError,
    FederatedTexts,
    split_train_test,
)


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

# A short name per topic (its first noun's domain): labels of the classification task.
TOPIC_NAMES: tuple[str, ...] = tuple(t.nouns[0] for t in TOPICS)

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


def _document(rng: random.Random, topic_w: Sequence[float], style_w: Sequence[float]) -> tuple[str, int]:
    """A document and its topic (the label of the synthetic classification task)."""
    topic, style = _pick(rng, topic_w), STYLES[_pick(rng, style_w)]
    n = rng.randint(*SENTENCES)
    return " ".join(_sentence(rng, topic, topic_w, style) for _ in range(n)), topic


def _labelled_documents(
    rng: random.Random, n: int, topic_w: Sequence[float], style_w: Sequence[float], seen: set[str]
) -> list[tuple[str, int]]:
    """``n`` (document, topic) pairs whose documents are not in ``seen`` (so a client's
    splits never share a text), added to it."""
    docs: list[tuple[str, int]] = []
    while len(docs) < n:
        doc, topic = _document(rng, topic_w, style_w)
        if doc not in seen:
            seen.add(doc)
            docs.append((doc, topic))
    return docs


def _documents(
    rng: random.Random, n: int, topic_w: Sequence[float], style_w: Sequence[float], seen: set[str]
) -> list[str]:
    return [doc for doc, _ in _labelled_documents(rng, n, topic_w, style_w, seen)]


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


def _check_topics(cfg: DataConfig) -> None:
    if cfg.num_topics > len(TOPICS):
        raise DataError(
            f"data.num_topics: the synthetic corpus has {len(TOPICS)} topics, got {cfg.num_topics}"
        )


def synthetic_client(cfg: DataConfig, index: int, task: str = "causal_lm") -> ClientSplit:
    """Client ``index``'s split alone: ``docs_per_client`` documents of its own stream,
    the last ``round(test_fraction * n)`` of them its test split (i.i.d. within a client),
    as records of ``task`` (a document, its topic label, or questions about it)."""
    _check_topics(cfg)
    docs = _client(cfg.seed, index, cfg.num_topics, cfg.heterogeneity, cfg.docs_per_client)
    records = _records(task, docs, cfg, stream=f"{cfg.seed}:client:{index}")
    return split_train_test(records, cfg.test_fraction, seed=None)


@functools.lru_cache(maxsize=256)  # bounded: a process may serve thousands of clients
def _client(seed: int, index: int, num_topics: int, heterogeneity: float,
            docs: int) -> tuple[tuple[str, int], ...]:
    topic_w, style_w = client_mixtures(index, num_topics, heterogeneity)
    return tuple(_labelled_documents(_rng(seed, f"client:{index}"), docs, topic_w, style_w, set()))


def _records(task: str, docs, cfg: DataConfig, *, stream: str) -> tuple[str, ...]:
    from fedslm.tasks import get_task

    return get_task(task).synthetic_records(docs, cfg, stream=stream)


def synthetic_central_test(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm") -> tuple[str, ...]:
    """The server's held-out set: ``max(1, 64 // num_clients)`` documents from each of the
    first ``min(num_clients, 64)`` clients' mixtures (separate streams from their splits).

    Capped at 64 documents so central evaluation costs the same at any population size;
    beyond 64 clients the first 64 cover every topic x style pairing that repeats
    (client i has topic i % num_topics and style i % 7).
    """
    _check_topics(cfg)
    per_client = max(1, CENTRAL_TEST_MAX // num_clients)
    central: list[tuple[str, int]] = []
    for i in range(min(num_clients, CENTRAL_TEST_MAX)):
        topic_w, style_w = client_mixtures(i, cfg.num_topics, cfg.heterogeneity)
        central += _labelled_documents(_rng(cfg.seed, f"central:{i}"), per_client, topic_w, style_w, set())
    return _records(task, central, cfg, stream=f"{cfg.seed}:central")


def synthetic_root(cfg: DataConfig, *, num_clients: int, num_docs: int,
                   task: str = "causal_lm") -> tuple[str, ...]:
    """FLTrust's root set in simulation (``fedslm.server.fltrust``): ``num_docs`` documents
    drawn like the central split (round-robin over the first ``min(num_clients, num_docs)``
    clients' mixtures) from streams of their own, so they are neither any client's train
    or test records nor central evaluation's (independent streams, as between clients)."""
    _check_topics(cfg)
    k = min(num_clients, num_docs)
    root: list[tuple[str, int]] = []
    for i in range(k):
        topic_w, style_w = client_mixtures(i, cfg.num_topics, cfg.heterogeneity)
        count = num_docs // k + (i < num_docs % k)
        root += _labelled_documents(_rng(cfg.seed, f"root:{i}"), count, topic_w, style_w, set())
    return _records(task, root, cfg, stream=f"{cfg.seed}:root")


def build_synthetic(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm") -> FederatedTexts:
    """Every client's split (``synthetic_client``), the public split and the central test
    set (``synthetic_central_test``)."""
    _check_topics(cfg)
    return FederatedTexts(
        clients=tuple(synthetic_client(cfg, i, task) for i in range(num_clients)),
        public=synthetic_public_corpus(cfg.seed),
        central_test=synthetic_central_test(cfg, num_clients=num_clients, task=task),
    )
