"""The built-in "shapes" vision task, its reward, and the paper's rewards on VL completions."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from services.core.tasks import BuiltinTask, Example, load_builtin
from services.core.tasks import shapes as s
from services.reward import verifiers as v
from services.reward.registry import get_task


def decode(example: Example) -> Image.Image:
    [data] = example.images
    return Image.open(io.BytesIO(data))


def key(example: Example) -> tuple[bytes, str]:
    """A problem's content: its picture and its question."""
    return example.images[0], example.prompt


@pytest.fixture(scope="module")
def task() -> BuiltinTask:
    return s.build(0)


def test_same_seed_same_examples_and_bytes(task: BuiltinTask) -> None:
    s.pool.cache_clear()
    s.out_of_domain.cache_clear()
    again = s.build(0)  # drawn and encoded afresh, not read from the cache
    assert again == task
    assert [e.images for e in again.train] == [e.images for e in task.train]
    assert again.ood == task.ood


def test_seed_reshuffles_the_same_pool(task: BuiltinTask) -> None:
    other = s.build(1)
    assert other.eval != task.eval
    assert set(other.train + other.eval) == set(task.train + task.eval)
    assert other.ood == task.ood  # fixed, whatever the seed


def test_split_sizes_and_unique_ids(task: BuiltinTask) -> None:
    assert (len(task.train), len(task.eval), len(task.ood)) == (
        s.POOL - s.HELD_OUT,
        s.HELD_OUT,
        s.OOD_PROBLEMS,
    )
    everything = task.train + task.eval + task.ood
    assert len({e.id for e in everything}) == len(everything)
    assert all(e.task == "shapes" and e.id.startswith("shapes-") for e in everything)


def test_splits_are_disjoint(task: BuiltinTask) -> None:
    train = {key(e) for e in task.train}
    assert not train & {key(e) for e in task.eval}
    assert not train & {key(e) for e in task.ood}
    # Stronger: no held-out picture is ever trained on, whatever the question.
    train_pictures = {e.images[0] for e in task.train}
    assert not train_pictures & {e.images[0] for e in task.eval}


def test_images_are_56px_rgb_pngs(task: BuiltinTask) -> None:
    for example in task.train[:200] + task.eval[:50] + task.ood[:50]:
        image = decode(example)
        assert image.format == "PNG"
        assert image.mode == "RGB" and image.size == (56, 56)


def test_backgrounds_white_in_domain_dark_grey_out_of_domain(task: BuiltinTask) -> None:
    for example in task.train + task.eval:
        assert decode(example).getpixel((0, 0)) == s.WHITE
    for example in task.ood:
        assert decode(example).getpixel((0, 0)) == s.DARK_GREY


def test_pictures_show_the_answer() -> None:
    """A count answer is the number of shapes drawn; a colour answer is their colour."""
    for example in s.pool()[:96]:
        image = decode(example)
        colours = {c for _, c in image.getcolors() or []} - {s.WHITE}
        assert len(colours) == 1  # one shape colour, no anti-aliased blends
        quadrants = [
            image.crop((x, y, x + s.CELL, y + s.CELL)) for x in (0, s.CELL) for y in (0, s.CELL)
        ]
        drawn = sum(len(q.getcolors() or []) > 1 for q in quadrants)  # one shape per quadrant
        if example.prompt == s.COLOUR_PROMPT:
            assert colours == {s.PALETTE[example.answer]}
        else:
            assert drawn == int(example.answer)


def test_prompts_and_answers_are_short_ascii(task: BuiltinTask) -> None:
    for example in task.train + task.eval + task.ood:
        assert example.prompt in (s.COLOUR_PROMPT, s.COUNT_PROMPT)
        assert len(example.prompt) <= 40 and example.prompt.isascii()
        assert len(example.answer) <= 6 and example.answer.isascii()
        expected = set(s.PALETTE) if example.prompt == s.COLOUR_PROMPT else {"1", "2", "3"}
        assert example.answer in expected


@pytest.mark.parametrize("split", ["train", "eval", "ood"])
def test_answers_are_balanced(task: BuiltinTask, split: str) -> None:
    examples = getattr(task, split)
    questions = Counter(e.prompt for e in examples)
    assert min(questions.values()) > 0.4 * len(examples)
    answers = Counter(e.answer for e in examples)
    assert set(answers) == {*s.PALETTE, "1", "2", "3"}
    colours = [answers[c] for c in s.PALETTE]
    counts = [answers[n] for n in "123"]
    assert min(colours) > 0.5 * max(colours) and min(counts) > 0.5 * max(counts)


def test_load_builtin() -> None:
    task = load_builtin("shapes", 0)
    assert task.name == "shapes" and task.train and task.eval and task.ood
    assert len(task.train[0].images) == 1


# ----------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("red", "red", 1.0),
        ("  Red\n", "red", 1.0),  # stripped, case ignored
        ("YELLOW", "yellow", 1.0),
        ("2", "2", 1.0),
        (" 2 ", "2", 1.0),
        ("blue", "red", 0.0),
        ("3", "2", 0.0),
        ("red.", "red", 0.0),  # anything more is wrong
        ("2 shapes", "2", 0.0),
        ("two", "2", 0.0),
        ("02", "2", 0.0),
        ("", "red", 0.0),
    ],
)
def test_shapes_reward(completion: str, answer: str, reward: float) -> None:
    result = v.shapes(completion, [answer])
    assert result.status is v.Status.SCORED
    assert result.reward == reward
    assert get_task("shapes")(completion, [answer]).reward == reward


# ----------------------------------------------------------------------------- paper rewards


@pytest.mark.parametrize(
    ("completion", "answer", "reward", "fmt"),
    [
        ("<think>The angle is 180-120=60 degrees.</think> The answer is \\boxed{60}", "60", 1.0, 1),
        ("<think>The angle is 180-120=60 degrees.</think> \\boxed{60^\\circ}", "60", 1.0, 1),
        ("<think>By Pythagoras, x = \\sqrt{9+16}.</think> \\boxed{5}", "5", 1.0, 1),
        ("<think>Area is half base times height.</think> \\boxed{\\frac{15}{2}}", "7.5", 1.0, 1),
        ("<think>The angle is 180-130=50 degrees.</think> The answer is \\boxed{50}", "60", 0.1, 1),
        ("The angle is 180-120=60 degrees. The answer is \\boxed{60}", "60", 0.9, 0),
        ("<think>The angle is 60 degrees.</think> The answer is 60", "60", 0.0, 0),
    ],
)
def test_math_reward_on_geo3k_completions(
    completion: str, answer: str, reward: float, fmt: int
) -> None:
    result = get_task("math")(completion, [answer])
    assert result.status is v.Status.SCORED
    assert result.reward == pytest.approx(reward)
    assert result.terms["format"] == fmt


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("<think>The person is smiling.</think> \\boxed{amusement}", 1.0),
        ("<think>The person is smiling.</think> \\boxed{Amusement}", 1.0),
        ("<think>The person is smiling.</think> The emotion is amusement.", 0.9),  # no box
        ("The person is smiling. \\boxed{amusement}", 0.9),  # no think block
        ("<think>Dark clouds over a grave.</think> \\boxed{sadness}", 0.1),
        ("<think>The person is smiling.</think> \\boxed{happy}", 0.1),  # not an EmoSet label
    ],
)
def test_emotion_reward_on_emoset_completions(completion: str, reward: float) -> None:
    result = get_task("emotion")(completion, ["amusement"])
    assert result.status is v.Status.SCORED
    assert result.reward == pytest.approx(reward)
