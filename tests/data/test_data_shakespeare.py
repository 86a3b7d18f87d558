"""Shakespeare by speaker (LEAF): eligible speakers pinned, order kept, every client usable."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import DataConfig
from fedslm.data import DataError, build_federated_texts
from fedslm.data.shakespeare import eligible_speakers, speaker_line_counts

# The CI checkout has ../shared/data beside the repository root; never copied into the repo.
SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt"
needs_file = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")


def hand_counts(path: Path) -> dict[str, int]:
    """An independent parse: a line ending in ':' after a blank line names the speaker."""
    counts: dict[str, int] = {}
    speaker, previous_blank = None, True
    for line in path.read_text(encoding="utf-8").splitlines():
        if previous_blank and line.endswith(":"):
            speaker = line[:-1]
            counts.setdefault(speaker, 0)
        elif line.strip():
            counts[speaker] += 1
        previous_blank = not line.strip()
    return counts


def shakespeare(num_clients: int, **overrides):
    config = DataConfig(source="shakespeare", path=str(SHAKESPEARE), **overrides)
    return build_federated_texts(config, num_clients=num_clients)


@needs_file
def test_line_counts_and_eligible_speakers_match_a_hand_parse_and_pinned_numbers():
    counts = hand_counts(SHAKESPEARE)
    assert speaker_line_counts(SHAKESPEARE) == counts
    assert (len(counts), sum(counts.values())) == (309, 25555)
    pinned = {1: 299, 16: 171, 64: 88, 100: 70}
    for min_lines, expected in pinned.items():
        assert len(eligible_speakers(SHAKESPEARE, min_lines)) == expected
        assert sum(n >= min_lines for n in counts.values()) == expected
    assert eligible_speakers(SHAKESPEARE, 500) == [
        "GLOUCESTER", "DUKE VINCENTIO", "KING RICHARD II", "LEONTES", "CORIOLANUS",
        "ROMEO", "MENENIUS", "PETRUCHIO", "JULIET",
    ]


@needs_file
def test_clients_are_the_speakers_with_most_lines_each_cut_train_then_test():
    texts = shakespeare(10, min_lines=64, test_fraction=0.2)
    assert len(texts.clients) == 10 and texts.public == ()
    assert all(c.train and c.test for c in texts.clients)
    gloucester = texts.clients[0]
    train_lines = sum(len(t.splitlines()) for t in gloucester.train)
    test_lines = sum(len(t.splitlines()) for t in gloucester.test)
    assert (train_lines, test_lines) == (722, 180)  # 902 lines, round(0.2 * 902) = 180 test
    lines = [sum(len(t.splitlines()) for t in c.train + c.test) for c in texts.clients]
    assert lines == [902, 822, 758, 679, 674, 604, 585, 568, 551, 498]
    assert len(texts.central_test) == 64
    assert set(texts.central_test) <= {t for c in texts.clients for t in c.test}


@needs_file
def test_more_clients_than_eligible_speakers_is_a_data_error():
    message = r"^federation\.num_clients: 10 clients but only 9 speakers have >= 500 lines"
    with pytest.raises(DataError, match=message + r" \(data\.min_lines\)"):
        shakespeare(10, min_lines=500)


def test_parse_keeps_play_order_and_cuts_each_speaker_once(tmp_path):
    play = tmp_path / "play.txt"
    play.write_text(
        "ANNE:\na1\na2\n\nBEN:\nb1\n\nANNE:\na3\na4\na5\n\nBEN:\n\nCAL:\nc1\n\n"
        "continued c2\n\nANNE:\na6\n"
    )
    assert speaker_line_counts(play) == {"ANNE": 6, "BEN": 1, "CAL": 2}
    assert eligible_speakers(play, 2) == ["ANNE", "CAL"]
    config = DataConfig(source="shakespeare", path=str(play), min_lines=2, test_fraction=0.4)
    anne, cal = build_federated_texts(config, num_clients=2).clients
    # ANNE's 6 lines: first 4 train, last round(0.4 * 6) = 2 test; the a3-a5 block is cut
    assert anne.train == ("a1\na2", "a3\na4") and anne.test == ("a5", "a6")
    assert cal.train == ("c1",) and cal.test == ("continued c2",)
    one_line_ben = DataConfig(source="shakespeare", path=str(play), min_lines=1)
    message = r"^federation\.num_clients: client 2 has no test texts \(1 in total\); raise data\.min_lines"
    with pytest.raises(DataError, match=message):
        build_federated_texts(one_line_ben, num_clients=3)


def test_missing_file_names_data_path(tmp_path):
    missing = DataConfig(source="shakespeare", path=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"^data\.path: .*nope\.txt does not exist$"):
        build_federated_texts(missing, num_clients=1)
