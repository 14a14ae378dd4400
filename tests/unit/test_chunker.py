"""SentenceChunker: where streamed reply text is cut, and that spans stay exact."""

from __future__ import annotations

import random

import pytest

from services.tts.chunker import Chunk, SentenceChunker


def run(deltas: list[str], **kwargs: int) -> list[Chunk]:
    chunker = SentenceChunker(**kwargs)
    out: list[Chunk] = []
    for delta in deltas:
        out += chunker.push(delta)
    return out + chunker.flush()


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks]


def assert_exact(reply: str, chunks: list[Chunk]) -> None:
    """Every chunk is its span of the reply, trimmed, and only whitespace lies between them."""
    pos = 0
    for chunk in chunks:
        assert reply[chunk.start:chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.start >= pos and not reply[pos:chunk.start].strip()
        pos = chunk.end
    assert not reply[pos:].strip()


def test_emits_a_sentence_once_whitespace_follows() -> None:
    chunker = SentenceChunker()
    assert chunker.push("Hello there.") == []
    assert chunker.push(" How") == [Chunk("Hello there.", 0, 12)]
    assert chunker.push(" are you?") == []
    assert chunker.flush() == [Chunk("How are you?", 13, 25)]


def test_each_terminal_ends_a_sentence() -> None:
    reply = "One. Two! Three? Four… Five"
    assert texts(run([reply])) == ["One.", "Two!", "Three?", "Four…", "Five"]


def test_newline_ends_a_chunk_without_waiting() -> None:
    chunker = SentenceChunker()
    assert chunker.push("First line\n") == [Chunk("First line", 0, 10)]
    assert chunker.push("\n\nSecond line") == []
    assert chunker.flush() == [Chunk("Second line", 13, 24)]


def test_deltas_split_mid_word_and_mid_punctuation() -> None:
    deltas = ["Wa", "it.", ".", ". Rea", "lly", "?", "!", " Ye", "s"]
    chunks = run(deltas)
    assert texts(chunks) == ["Wait...", "Really?!", "Yes"]
    assert_exact("".join(deltas), chunks)


def test_period_at_the_end_of_a_delta_may_be_a_decimal() -> None:
    chunker = SentenceChunker()
    assert chunker.push("It costs 3.") == []
    assert chunker.push("5") == []
    assert chunker.push(" dollars. Thanks") == [Chunk("It costs 3.5 dollars.", 0, 21)]
    assert texts(chunker.flush()) == ["Thanks"]


def test_decimals_versions_and_urls_do_not_split() -> None:
    reply = "Pi is 3.14159 and v1.2.3 is on example.com today. Next"
    assert texts(run([reply])) == ["Pi is 3.14159 and v1.2.3 is on example.com today.", "Next"]


def test_abbreviations_do_not_end_a_sentence() -> None:
    reply = "Dr. Smith met Mr. Jones, e.g. at noon, i.e. lunch, with fruit etc. and left. Done."
    assert texts(run([reply])) == [
        "Dr. Smith met Mr. Jones, e.g. at noon, i.e. lunch, with fruit etc. and left.",
        "Done.",
    ]


def test_abbreviation_split_across_deltas() -> None:
    deltas = ["Ask D", "r", ".", " ", "Who", " now. ", "Or e", ".", "g", ". ", "me."]
    assert texts(run(deltas)) == ["Ask Dr. Who now.", "Or e.g. me."]


def test_initials_join_but_the_pronoun_i_ends() -> None:
    assert texts(run(["J. R. R. Tolkien wrote it. So did I. Really."])) == [
        "J. R. R. Tolkien wrote it.", "So did I.", "Really.",
    ]


def test_numbered_list_markers_stay_with_their_item() -> None:
    reply = "Steps:\n1. Open the door.\n2. Walk in. I am 25. Yes."
    assert texts(run(list(reply))) == [
        "Steps:", "1. Open the door.", "2. Walk in.", "I am 25.", "Yes.",
    ]


def test_closing_quotes_and_brackets_stay_with_the_sentence() -> None:
    reply = 'He said "stop." Then (quietly.) she left.'
    assert texts(run([reply])) == ['He said "stop."', "Then (quietly.)", "she left."]


def test_long_text_without_punctuation_is_cut_at_spaces() -> None:
    words = [f"word{i}" for i in range(60)]
    reply = " ".join(words)
    chunks = run(list(reply), max_chars=30)
    assert len(chunks) > 1
    assert all(len(c.text) <= 30 for c in chunks)
    assert " ".join(texts(chunks)).split() == words  # no word was split
    assert_exact(reply, chunks)


def test_long_text_is_cut_at_the_last_clause_break() -> None:
    reply = "alpha beta gamma, delta epsilon zeta; eta theta iota kappa lambda"
    chunks = run([reply], max_chars=40)
    assert texts(chunks) == ["alpha beta gamma, delta epsilon zeta;", "eta theta iota kappa lambda"]
    assert_exact(reply, chunks)


def test_long_text_is_cut_at_a_spaced_dash_not_a_hyphen() -> None:
    reply = "a well-known fact - the sky is blue and wide-open everywhere"
    chunks = run([reply], max_chars=30)
    assert texts(chunks)[0] == "a well-known fact -"
    assert_exact(reply, chunks)


def test_comma_inside_a_number_is_not_a_clause_break() -> None:
    reply = "about 1,000,000 people live there and more come"
    chunks = run([reply], max_chars=20)
    assert texts(chunks) == ["about 1,000,000", "people live there", "and more come"]
    assert_exact(reply, chunks)


def test_long_sentence_is_cut_before_its_end() -> None:
    reply = "This sentence is far longer than the limit allows, so it is cut. Short one."
    chunks = run([reply], max_chars=40)
    assert texts(chunks) == [
        "This sentence is far longer than the", "limit allows, so it is cut.", "Short one.",
    ]


def test_a_word_longer_than_max_chars_is_cut_hard() -> None:
    reply = "x" * 25
    chunks = run([reply], max_chars=10)
    assert texts(chunks) == ["x" * 10, "x" * 10, "x" * 5]
    assert_exact(reply, chunks)


def test_min_chars_joins_short_sentences() -> None:
    reply = "Hi. Ok. This one is long enough. Yes."
    chunks = run([reply], min_chars=12)
    assert texts(chunks) == ["Hi. Ok. This one is long enough.", "Yes."]
    assert_exact(reply, chunks)


def test_flush_emits_the_rest_once() -> None:
    chunker = SentenceChunker()
    assert chunker.push("  Trailing words") == []
    assert chunker.flush() == [Chunk("Trailing words", 2, 16)]
    assert chunker.flush() == []


def test_flush_of_whitespace_emits_nothing() -> None:
    chunker = SentenceChunker()
    assert chunker.push("Done. \n ") == [Chunk("Done.", 0, 5)]
    assert chunker.flush() == []
    assert run([]) == []


def test_spans_continue_after_flush() -> None:
    chunker = SentenceChunker()
    assert chunker.push("One. ") == [Chunk("One.", 0, 4)]
    assert chunker.flush() == []
    chunker.push("Two")
    assert chunker.flush() == [Chunk("Two", 5, 8)]


REPLY = (
    "Sure! Here's the plan for Mr. Brown's trip, e.g. the flights:\n"
    "1. Leave at 7.30 a.m. on Monday.\n2. Arrive at noon… Then rest.\n\n"
    'He said "that costs $1,250.99." Is that ok?! '
    + "then a long run of words without any sentence end at all that goes on and on " * 3
    + "until it ends."
)


@pytest.mark.parametrize("seed", range(20))
def test_random_delta_splits_give_the_same_exact_chunks(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(REPLY)), rng.randrange(1, 80)))
    deltas = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
    chunks = run(deltas, max_chars=60)
    assert chunks == run([REPLY], max_chars=60) == run(list(REPLY), max_chars=60)
    assert all(len(c.text) <= 60 for c in chunks)
    assert_exact(REPLY, chunks)


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        SentenceChunker(max_chars=0)


def test_the_first_chunk_may_be_a_clause_then_sentences_follow() -> None:
    reply = "Sure, I can help with that, and more. Then another one, ok. "
    chunks = run(["Sure, ", "I can help with that, ", "and more. Then ", "another one, ok. "],
                 first_clause=12)
    # "Sure," is too short alone; the first clause past 12 characters ends the first chunk,
    # and the rest is cut at sentence ends only (the comma in "another one, ok" stays).
    assert texts(chunks) == ["Sure, I can help with that,", "and more.", "Then another one, ok."]
    assert_exact(reply, chunks)


def test_a_first_sentence_shorter_than_its_first_clause_goes_as_a_sentence() -> None:
    assert texts(run(["Hi. Well, this is long, really. "], first_clause=12)) == \
        ["Hi.", "Well, this is long, really."]
    # Undecided until whitespace follows the mark: "1,000" is no clause break.
    assert texts(run(["It costs 1,000 dollars, ", "more or less."], first_clause=5)) == \
        ["It costs 1,000 dollars,", "more or less."]


@pytest.mark.parametrize("seed", range(10))
def test_first_clause_chunks_do_not_depend_on_how_the_text_was_split(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(REPLY)), rng.randrange(1, 80)))
    deltas = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
    chunks = run(deltas, max_chars=60, first_clause=12)
    assert chunks == run([REPLY], max_chars=60, first_clause=12)
    assert_exact(REPLY, chunks)
