"""The infotext pair scanner reads exactly what the findall pattern reads, in linear time."""

import random
import re
import threading

from baka.generate import infotext

# the pattern baka used before (A1111's reading plus '+' in keys); findall semantics are the reference
PATTERN = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def test_matches_the_pattern_on_random_lines():
    rng = random.Random(0)
    alphabet = [
        "a",
        "b",
        "Z",
        "1",
        "_",
        " ",
        " ",
        ",",
        ",",
        ":",
        ":",
        '"',
        "\\",
        "-",
        "/",
        "+",
        "!",
        "é",
        "\t",
    ]
    for _ in range(4000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert infotext.pairs(line) == PATTERN.findall(line), repr(line)


def test_reads_a1111_lines():
    line = (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
        'Lora hashes: "a: 1, b: 2", Size: 512x768'
    )
    assert dict(infotext.pairs(line)) == {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Lora hashes": '"a: 1, b: 2"',
        "Size": "512x768",
    }
    assert infotext.parse("p\nNegative prompt: n\n" + line)[2]["Lora hashes"] == "a: 1, b: 2"


def test_long_lines_are_linear():
    # a complexity guard, not a speed goal: the backtracking pattern takes minutes on these
    lines = ["a" * 200_000, "a " * 100_000 + ":", ('"' + "\\a" * 50_000) * 2, "k: " + '"' * 100_000]
    done = []
    worker = threading.Thread(target=lambda: done.extend(infotext.parse(x) for x in lines), daemon=True)
    worker.start()
    worker.join(30)
    assert len(done) == len(lines)
