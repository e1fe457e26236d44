import pytest
from hypothesis import given
from hypothesis import strategies as st

from stem_cli.units import format_length, parse_length, parse_lengths


@given(st.integers(1, 10**6), st.sampled_from(["k", "K"]))
def test_kilo_suffix_is_1024(n, suffix):
    assert parse_length(f"{n}{suffix}") == n * 1024


@given(st.integers(1, 10**4), st.sampled_from(["m", "M"]))
def test_mega_suffix_is_1024_squared(n, suffix):
    assert parse_length(f"{n}{suffix}") == n * 1024 * 1024


@given(st.integers(1, 10**12), st.sampled_from(["", " ", "\t", "  "]))
def test_plain_digits_with_spaces_around(n, space):
    assert parse_length(f"{space}{n}{space}") == n


@given(st.integers(1, 2**40))
def test_format_reads_back(n):
    assert parse_length(format_length(n)) == n


@given(st.text(max_size=12))
def test_any_text_gives_a_count_or_names_itself(text):
    try:
        assert parse_length(text) > 0
    except ValueError as error:
        assert repr(text) in str(error)


@pytest.mark.parametrize(
    "text, n",
    [("4k", 4096), ("128K", 131072), ("131072", 131072), ("1m", 1048576), ("1.5k", 1536), (".5k", 512), ("2.0", 2)],
)
def test_examples(text, n):
    assert parse_length(text) == n


@pytest.mark.parametrize(
    "text", ["", " ", "0", "0k", "-4k", "-4096", "abc", "4kb", "k", "4 k", "1.1k", "1e3", "4k4", "1,000", "0.5"]
)
def test_bad_values_say_what_is_allowed(text):
    with pytest.raises(ValueError) as caught:
        parse_length(text)
    assert repr(text) in str(caught.value)
    assert "4k" in str(caught.value) and "128K" in str(caught.value)


def test_lists():
    assert parse_lengths("4k,8k") == [4096, 8192]
    assert parse_lengths(" 4k , 16K,1000 ") == [4096, 16384, 1000]
    assert parse_lengths("1m") == [1048576]
    with pytest.raises(ValueError, match="'4k,,8k'"):
        parse_lengths("4k,,8k")
    with pytest.raises(ValueError, match="'8kb'"):
        parse_lengths("4k,8kb")


@pytest.mark.parametrize(
    "n, text",
    [(4096, "4K"), (131072, "128K"), (1536, "1536"), (1000, "1000"), (1048576, "1M"), (3 * 1048576 + 1024, "3073K")],
)
def test_format(n, text):
    assert format_length(n) == text
