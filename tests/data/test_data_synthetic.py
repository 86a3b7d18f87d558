"""The synthetic corpus: deterministic, shaped as configured, and heterogeneous on demand."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from fedslm.config import DataConfig
from fedslm.data import DataError, FederatedTexts, build_federated_texts, synthetic_public_corpus
from fedslm.data.synthetic import COMMON, COMMON_TEMPLATES, STYLES, TOPICS, build_synthetic


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def build(num_clients: int = 10, **overrides) -> FederatedTexts:
    return build_federated_texts(DataConfig(**overrides), num_clients=num_clients)


def all_texts(texts: FederatedTexts) -> list[str]:
    return [t for c in texts.clients for t in c.train + c.test]


def test_same_seed_gives_identical_corpus_and_another_seed_a_different_one():
    assert build(seed=3) == build(seed=3)
    other = build(seed=4)
    assert all(a.train != b.train for a, b in zip(build(seed=3).clients, other.clients))
    assert synthetic_public_corpus(3) != synthetic_public_corpus(4)


def test_client_count_docs_per_client_and_test_fraction():
    texts = build(num_clients=13, docs_per_client=48, test_fraction=0.2)
    assert len(texts.clients) == 13
    assert [(len(c.train), len(c.test)) for c in texts.clients] == [(38, 10)] * 13
    small = build(num_clients=2, docs_per_client=4, test_fraction=0.1)
    assert [(len(c.train), len(c.test)) for c in small.clients] == [(3, 1)] * 2


def test_no_text_is_shared_between_any_splits():
    texts = build(num_clients=10)
    pooled = all_texts(texts) + list(texts.central_test)
    assert len(pooled) == len(set(pooled)) == 10 * 48 + 10 * 6  # 64 // 10 central docs per client
    assert not set(texts.public) & set(pooled)


def test_client_docs_do_not_depend_on_how_many_clients_there_are():
    assert build(num_clients=4).clients[3] == build(num_clients=12).clients[3]


def test_documents_are_a_few_sentences_of_40_to_100_words():
    counts = [len(t.split()) for t in all_texts(build(num_clients=10))]
    assert 30 <= min(counts) and max(counts) <= 120  # 5-8 sentences of 6-15 words
    assert 50 <= sum(counts) / len(counts) <= 70


def test_public_split_is_the_config_independent_uniform_mixture():
    public = synthetic_public_corpus()
    assert len(public) == 400 and len(set(public)) == 400
    assert build(seed=0).public == public == build(seed=0, heterogeneity=0.0, num_topics=2).public
    assert {w for t in public for w in words(t)} == designed_vocabulary()  # tokenizer sees all
    assert len(designed_vocabulary()) == 484  # pinned; a BPE vocab of 512-1024 covers it


def designed_vocabulary() -> set[str]:
    """Every word the generator can write: word lists, template and opener words, 'an'."""
    fixed = [s for style in STYLES for s in style.templates + style.openers] + list(COMMON_TEMPLATES)
    vocabulary = {w for s in fixed for w in words(re.sub(r"\{\w\}", " ", s))} | {"an"}
    vocabulary |= {w for ws in COMMON.values() for w in ws}
    return vocabulary | {w for t in TOPICS for w in t.nouns + t.verbs + t.adjectives}


def test_word_lists_are_disjoint_so_topic_shares_are_exact():
    lists = [set(t.nouns + t.verbs + t.adjectives) for t in TOPICS]
    lists.append({w for ws in COMMON.values() for w in ws})
    assert sum(len(s) for s in lists) == len(set().union(*lists))
    assert len(TOPICS) == 16 and len(STYLES) == 7


def topic_share(texts: FederatedTexts, num_topics: int) -> list[float]:
    """Per client: fraction of its topic words that come from its own topic i % num_topics."""
    topic_of = {w: k for k, t in enumerate(TOPICS) for w in t.nouns + t.verbs + t.adjectives}
    shares = []
    for i, client in enumerate(texts.clients):
        hits = [topic_of[w] for t in client.train for w in words(t) if w in topic_of]
        shares.append(sum(k == i % num_topics for k in hits) / len(hits))
    return shares


def test_each_client_talks_only_about_its_own_topic_at_full_heterogeneity():
    assert topic_share(build(num_clients=10, heterogeneity=1.0), 8) == [1.0] * 10
    iid = topic_share(build(num_clients=10, heterogeneity=0.0), 8)
    assert max(iid) < 0.3  # about 1/8 each


def mean_distance_to_pool(texts: FederatedTexts) -> float:
    """Mean total-variation distance between each client's unigram distribution and the pool's."""
    per_client = [Counter(w for t in c.train for w in words(t)) for c in texts.clients]
    pool = sum(per_client, Counter())
    total = sum(pool.values())
    distances = []
    for counts in per_client:
        n = sum(counts.values())
        distances.append(0.5 * sum(abs(counts[w] / n - pool[w] / total) for w in pool))
    return sum(distances) / len(distances)


def test_heterogeneity_moves_clients_away_from_the_pooled_distribution():
    tv = [mean_distance_to_pool(build(num_clients=10, heterogeneity=h)) for h in (0.0, 0.5, 1.0)]
    assert tv[0] < tv[1] < tv[2]
    assert tv[0] < 0.2 and tv[2] > 0.45 and tv[2] > 3 * tv[0]


def test_more_topics_than_the_corpus_has_is_a_data_error():
    with pytest.raises(DataError, match=r"^data\.num_topics: the synthetic corpus has 16 topics"):
        build_synthetic(DataConfig(num_topics=17), num_clients=2)


def bigram_perplexity(train: list[str], test: tuple[str, ...], extra: list[str] = ()) -> float:
    """Add-0.1 word-bigram perplexity; ``extra`` texts count 9x (a cheap stand-in for adapting)."""
    unigrams, bigrams = Counter(), Counter()
    for weight, texts in ((1, train), (9, extra)):
        for text in texts:
            tokens = ["<s>", *words(text)]
            for a, b in zip(tokens, tokens[1:]):
                unigrams[a] += weight
                bigrams[a, b] += weight
    nll, n = 0.0, 0
    for text in test:
        tokens = ["<s>", *words(text)]
        for a, b in zip(tokens, tokens[1:]):
            nll -= math.log((bigrams[a, b] + 0.1) / (unigrams[a] + 0.1 * 600))
            n += 1
    return math.exp(nll / n)


@pytest.mark.parametrize(("heterogeneity", "low", "high"), [(0.0, 1.0, 1.1), (0.9, 0.6, 0.75)])
def test_adapting_to_a_client_pays_off_only_when_clients_differ(heterogeneity, low, high):
    texts = build(num_clients=10, heterogeneity=heterogeneity)
    pooled = [t for c in texts.clients for t in c.train]
    ratios = [bigram_perplexity(pooled, c.test, list(c.train)) / bigram_perplexity(pooled, c.test)
              for c in texts.clients]
    assert low < sum(ratios) / len(ratios) < high  # observed 1.055 at h=0 (no gain), 0.676 at h=0.9
