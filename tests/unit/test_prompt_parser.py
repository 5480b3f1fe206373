"""The A1111 prompt language as text: emphasis, BREAK, prompt editing, alternation, extra-network tags."""

from __future__ import annotations

import pytest

from pipelines.prompts.parser import (
    ExtraNetworkTag,
    extract_extra_networks,
    get_prompt_schedule,
    parse_prompt_attention,
)

DOWN = 1 / 1.1


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", DOWN)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", DOWN * 1.1),
                (" a ", 1.1),
                ("hill", 0.5 * 1.1),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        ),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[[a]]", [("a", DOWN * DOWN)]),
        ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
        ("( a : 0.25 )", [(" a ", 0.25)]),
        ("(a:-1)", [("a", -1.0)]),
        ("(a:0)", [("a", 0.0)]),
        ("a:b", [("a:b", 1.0)]),
        ("a (b:c) d", [("a ", 1.0), ("b:c", 1.1), (" d", 1.0)]),
        ("(a:1.3", [("a:1.3", 1.1)]),
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
        ("x:1.2) y", [("x:1.2) y", 1.0)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("a\\\\b", [("a\\b", 1.0)]),
        ("a\\b", [("ab", 1.0)]),
        ("\\(a\\) (b)", [("(a) ", 1.0), ("b", 1.1)]),
        ("(café:1.2) 日本 🐱", [("café", 1.2), (" 日本 🐱", 1.0)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_emphasis(prompt, expected):
    result = parse_prompt_attention(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected])


def test_nested_weights_multiply_in_a1111_order():
    # Exact float values matter: they decide which neighbouring pieces merge.
    assert parse_prompt_attention("a (((house:1.3)) x")[1] == ("house", 1.5730000000000004)


def test_crossed_brackets_are_independent():
    ((text, weight),) = parse_prompt_attention("([a)]")
    assert text == "a" and weight == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
        ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a:-1) BREAK b", [("a", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("aBREAK break Break", [("aBREAK break Break", 1.0)]),
        ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ],
)
def test_break(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [
        ("a [b:c:5] d", 10, [(5, "a b d"), (10, "a c d")]),
        ("[b:c:0.5]", 10, [(5, "b"), (10, "c")]),
        ("[b:c:0.5]", 7, [(3, "b"), (7, "c")]),
        ("[b:5]", 10, [(5, ""), (10, "b")]),
        ("[b::5]", 10, [(5, "b"), (10, "")]),
        ("[a:b:0]", 10, [(10, "b")]),
        ("[a:b:1.0]", 10, [(10, "a")]),
        ("[a:b:1]", 10, [(1, "a"), (10, "b")]),
        ("[a:b:15]", 10, [(10, "a")]),
        ("[a:b:-3]", 10, [(10, "b")]),
        ("[a:b: 3 ]", 10, [(3, "a"), (10, "b")]),
        ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),
        ("[a|b|c] x", 4, [(1, "a x"), (2, "b x"), (3, "c x"), (4, "a x")]),
        ("[a|] x", 2, [(1, "a x"), (2, " x")]),
        ("[[a:b:2]:c:4]", 10, [(2, "a"), (4, "b"), (10, "c")]),
        ("[[a|b]:c:3]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
        ("(x:1.2) [y:z:3]", 10, [(3, "(x:1.2) y"), (10, "(x:1.2) z")]),
        ("(x:[a:b:3])", 10, [(3, "(x:a)"), (10, "(x:b)")]),
        ("[x] (y)", 10, [(10, "[x] (y)")]),
        ("[a:b:5", 10, [(10, "[a:b:5")]),
        ("a [b:c:3] (d", 10, [(3, "a b (d"), (10, "a c (d")]),
        ("[a:b:c:5]", 10, [(10, "[a:b:c:5]")]),
        ("[e:f] [c:d:5]", 10, [(5, "[e:f] c"), (10, "[e:f] d")]),
        ("\\[a:b:3\\]", 10, [(10, "\\[a:b:3\\]")]),
        ("a|b [c:d:3]", 10, [(10, "a|b [c:d:3]")]),
        ("café [ß:日本:2]", 10, [(2, "café ß"), (10, "café 日本")]),
        ("", 20, [(20, "")]),
        ("plain prompt", 20, [(20, "plain prompt")]),
    ],
)
def test_schedule(prompt, steps, expected):
    assert get_prompt_schedule(prompt, steps) == expected


def test_a1111_landscape_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert get_prompt_schedule(prompt, 10) == [
        (2, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (5, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (6, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (7, "fantasy landscape with a lake and an oak in background masterful"),
        (10, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_hires_schedule_offsets():
    assert get_prompt_schedule("[a:b:1.5]", 10, hires_base_steps=20) == [(5, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:25]", 10, hires_base_steps=20) == [(5, "a"), (10, "b")]
    assert get_prompt_schedule("[a:b:0.5]", 10, hires_base_steps=20) == [(10, "b")]


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        get_prompt_schedule("a", 0)


def test_long_prompt_parses_quickly():
    prompt = ", ".join(f"[(word{i}:1.1):other{i}:{i % 7 + 1}] [a|b]" for i in range(100))
    schedule = get_prompt_schedule(prompt, 30)
    assert len(schedule) == 30 and schedule[0][1].startswith("(word0:1.1) a")


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a <lora:film:0.8> b", "a  b", [ExtraNetworkTag("lora", ("film", "0.8"))]),
        ("<hypernet:x>", "", [ExtraNetworkTag("hypernet", ("x",))]),
        (
            "<lora:a:1:te=0.5>, <lora:b:0.2>",
            ", ",
            [ExtraNetworkTag("lora", ("a", "1", "te=0.5")), ExtraNetworkTag("lora", ("b", "0.2"))],
        ),
        ("<not a tag> <lora:> <:x>", "<not a tag> <lora:> <:x>", []),
        ("", "", []),
    ],
)
def test_extra_networks(prompt, text, tags):
    assert extract_extra_networks(prompt) == (text, tags)


def test_only_a_tag_leaves_an_empty_prompt():
    text, tags = extract_extra_networks("<lora:x:0.5>")
    assert tags == [ExtraNetworkTag("lora", ("x", "0.5"))]
    assert get_prompt_schedule(text, 20) == [(20, "")]
    assert parse_prompt_attention(text) == [("", 1.0)]
