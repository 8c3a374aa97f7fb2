import pytest

from baka.errors import BakaError
from baka.generate.prompt import chunk_prompt, extract_networks, parse_prompt_attention
from baka.models.tokenizer import BOS_ID, EOS_ID, tokenize

# expected weights from A1111's own documented examples, plus edge cases
TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.1 * 1.1 * 1.3),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.1**4),
            (".", 1.1),
        ],
    ),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("x) y] z:w", [("x) y] z:w", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", TABLE)
def test_attention_table(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_short_prompt_is_one_padded_chunk():
    chunks, n = chunk_prompt("a (cat:1.5)")
    ids = tokenize("a cat")
    assert len(chunks) == 1 and n == 2
    c = chunks[0]
    assert len(c.tokens) == 77 and c.tokens[0] == BOS_ID and c.tokens[1:3] == ids
    assert c.tokens[3:] == [EOS_ID] * 74
    assert c.weights[:4] == [1.0, 1.0, 1.5, 1.0]


def test_long_prompt_chunks_with_comma_backtrack():
    words = ", ".join(f"tag{i}" for i in range(40))  # well over 75 tokens
    chunks, n = chunk_prompt(words)
    assert len(chunks) >= 2 and all(len(c.tokens) == 77 for c in chunks)
    comma = tokenize(",")[0]
    first = chunks[0].tokens[1:76]
    # the first chunk ends right after a comma (the words after it moved on), padded with EOS
    body = [t for t in first if t != EOS_ID]
    assert body[-1] == comma and len(body) < 75
    assert sum(len([t for t in c.tokens[1:76] if t != EOS_ID]) for c in chunks) == n == len(tokenize(words))


def test_no_backtrack_without_recent_comma():
    text = " ".join(["cat"] * 100)
    chunks, _ = chunk_prompt(text)
    assert chunks[0].tokens[1:76] == tokenize("cat") * 75
    assert chunks[1].tokens[1:26] == tokenize("cat") * 25


def test_break_starts_new_chunk():
    chunks, _ = chunk_prompt("red hair BREAK blue sky")
    assert len(chunks) == 2
    assert chunks[0].tokens[1:3] == tokenize("red hair") and chunks[0].tokens[3] == EOS_ID
    assert chunks[1].tokens[1:3] == tokenize("blue sky")


def test_lone_backslash_is_dropped_as_a1111():
    # A1111's parse_prompt_attention: a backslash escaping nothing contributes no text
    assert parse_prompt_attention("a \\ b") == [("a  b", 1.0)]
    assert parse_prompt_attention("(a\\:1.2)") == [("a", 1.2)]
    assert parse_prompt_attention("x\\\\y") == [("x\\y", 1.0)]  # an escaped backslash stays


def test_other_extra_network_tags_leave_the_text():
    text, tags = extract_networks("a <hypernet:anime:0.7> cat <lyco:st:0.5> <HyperNet:b>, <3 <x")
    assert text == "a  cat  , <3 <x"
    assert [(t.kind, t.name) for t in tags] == [("hypernet", "anime"), ("lora", "st"), ("hypernet", "b")]
    with pytest.raises(BakaError, match="not a number"):
        extract_networks("<lora:style:strong>")


def test_lora_tags():
    text, tags = extract_networks("a cat <lora:style:0.8> <lora:char:0.5:1:lbw=OUTALL>, <lora:x>")
    assert text == "a cat  , "
    assert [(t.name, t.te, t.unet, t.lbw) for t in tags] == [
        ("style", 0.8, 0.8, None),
        ("char", 0.5, 1.0, "OUTALL"),
        ("x", 1.0, 1.0, None),
    ]
