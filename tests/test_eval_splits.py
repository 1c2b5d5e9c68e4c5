"""What a run is scored on and how: the splits of the built-in task (train, validation, test,
out-of-domain) never meet, the warm start's split and batches depend on the seed alone, and the
sampled evaluation is the mean over k seeded samples beside the greedy one."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from services.core.config import load_config
from services.core.tasks import Example, load_builtin
from services.stack import progress
from services.stack.evaluate import Scores, eval_sets
from services.stack.up import demo_config_path
from services.stack.warmstart import WarmStartSettings, batch_indices, split_validation

OPERANDS = re.compile(r"^(-?\d+)([+-])(\d+)=$")


def parse(example: Example) -> tuple[int, str, int]:
    match = OPERANDS.match(example.prompt)
    assert match, example.prompt
    return int(match.group(1)), match.group(2), int(match.group(3))


def two_digit(example: Example) -> bool:
    a, _, b = parse(example)
    return 10 <= a <= 99 and 10 <= b <= 99


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("seed", range(4))
def test_train_validation_test_and_ood_never_meet(seed: int) -> None:
    task = load_builtin("arithmetic", seed)
    train, validation = split_validation(task.train, WarmStartSettings().val_problems)
    splits = {"train": train, "validation": validation, "test": task.eval, "ood": task.ood}
    assert len(task.eval) == 1000 and len(validation) == 256 and len(task.ood) >= 500
    for (a, xs), (b, ys) in itertools.combinations(splits.items(), 2):
        assert not {e.prompt for e in xs} & {e.prompt for e in ys}, f"{a} and {b} share problems"
        assert not {e.id for e in xs} & {e.id for e in ys}, f"{a} and {b} share ids"
    # Out of domain by construction: the training split holds two-digit operands only, and
    # every out-of-domain problem has an operand of another length.
    assert all(two_digit(e) for e in task.train)
    assert not any(two_digit(e) for e in task.ood)
    for e in task.ood:  # answers are right
        a, op, b = parse(e)
        assert e.answer == str(a + b if op == "+" else a - b)


def test_the_ood_split_is_the_same_problems_for_every_seed() -> None:
    ood = load_builtin("arithmetic", 0).ood
    assert len(ood) == 1000 and len({e.id for e in ood}) == 1000
    assert load_builtin("arithmetic", 1).ood == ood
    # Both kinds of one-digit problems are there: a one-digit first and second operand.
    assert any(parse(e)[0] < 10 for e in ood) and any(parse(e)[2] < 10 for e in ood)


def test_the_warm_start_split_and_batches_depend_on_the_seed_alone() -> None:
    import torch

    def split(seed: int) -> tuple[list[str], list[str]]:
        train, validation = split_validation(load_builtin("arithmetic", seed).train, 256)
        return [e.id for e in train], [e.id for e in validation]

    assert split(0) == split(0) and split(0) != split(1)
    count, batch = len(split(0)[0]), 128
    per_pass = count // batch

    def first_batches(seed: int, n: int = per_pass + 5) -> list[list[int]]:
        return [b.tolist() for b in itertools.islice(batch_indices(count, batch, seed), n)]

    first = first_batches(0)
    torch.manual_seed(1234)
    torch.rand(7)  # other draws from torch's global generator change nothing
    assert first_batches(0) == first
    assert first_batches(1) != first
    # A pass visits each problem at most once, then a fresh shuffle starts.
    seen = [i for b in first[:per_pass] for i in b]
    assert len(seen) == len(set(seen)) == per_pass * batch
    assert all(len(b) == batch for b in first)


# ----------------------------------------------------------------------------- evaluation


def test_eval_sets_follow_the_config(tmp_path: Path) -> None:
    from services.trainer.evaluation import Sampling

    demo = load_config(demo_config_path(), environ={})
    sets = eval_sets(demo)
    assert len(sets.test) == 1000 and sets.ood == list(load_builtin("arithmetic", 0).ood)
    # The paper's evaluation: temperature 0.5, top-p 0.95; k = 4 samples per problem.
    assert sets.sampling == Sampling(samples=4, temperature=0.5, top_p=0.95, seed=0)
    off = load_config(demo_config_path(), environ={}, overrides=["rollout.eval_samples=0"])
    assert eval_sets(off, limit=10).sampling is None and len(eval_sets(off, limit=10).ood) == 10

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    ood = tmp_path / "ood.jsonl"
    ood.write_text(json.dumps({"prompt": "100+1=", "answer": "101"}) + "\n")
    own = load_config(
        environ={},
        overrides=[f"task.dataset={data}", f"task.eval_dataset={data}"],
    )
    assert eval_sets(own).ood == []
    own = load_config(
        environ={},
        overrides=[f"task.dataset={data}", f"task.eval_dataset={data}", f"task.ood_dataset={ood}"],
    )
    assert [e.prompt for e in eval_sets(own).ood] == ["100+1="]


def test_scores_as_summary_fields_and_in_the_table() -> None:
    scores = Scores(0.4, 0.35, 0.1, None)
    assert scores.fields("final") == {
        "final_accuracy": 0.4,
        "final_sampled_accuracy": 0.35,
        "final_ood_accuracy": 0.1,
        "final_ood_sampled_accuracy": None,
    }
    assert scores.describe() == "40.0% greedy, 35.0% sampled; out-of-domain 10.0% greedy"
    summary = {
        **Scores(0.3, 0.25, 0.05, 0.04).fields("initial"),
        **Scores(0.4, 0.35, 0.1, 0.08).fields("final"),
        "steps": 3,
        "seconds": 1.0,
    }
    table = progress.summary_table(summary)
    assert "out-of-domain accuracy" in table and "5.0% -> 10.0%" in table
    assert "25.0% -> 35.0%" in table


@pytest.mark.slow
def test_sampled_evaluation_is_seeded_and_scores_the_mean_of_k(tiny_model: Path) -> None:
    import torch

    from services.stack.evaluate import load_policy
    from services.trainer.evaluation import (
        Sampling,
        greedy_completions,
        sampled_accuracy,
        sampled_completions,
    )

    model, tok = load_policy(tiny_model)
    prompts = [f"{a}+{b}=" for a, b in [(12, 34), (56, 78), (90, 11), (23, 45), (67, 89)]]
    hot = Sampling(samples=3, temperature=1.0, top_p=1.0, seed=0)
    state = torch.get_rng_state()
    first = sampled_completions(model, tok, prompts, hot)
    assert torch.equal(state, torch.get_rng_state()), "evaluation moved the caller's generator"
    assert [len(s) for s in first] == [3] * len(prompts)
    assert sampled_completions(model, tok, prompts, hot) == first
    assert sampled_completions(model, tok, prompts, Sampling(3, 1.0, 1.0, seed=1)) != first

    # Nearly cold sampling gives the greedy answer every time; scoring is the mean over k x N.
    greedy = greedy_completions(model, tok, prompts)
    cold = Sampling(samples=2, temperature=1e-4, top_p=1.0, seed=0)
    assert sampled_completions(model, tok, prompts, cold) == [[g, g] for g in greedy]
    pairs = list(enumerate(zip(prompts, greedy, strict=True)))
    right = [Example(str(i), p, g, "x") for i, (p, g) in pairs]
    wrong = [Example(f"w{i}", p, g + "0", "x") for i, (p, g) in pairs]
    assert sampled_accuracy(model, tok, right, cold) == 1.0
    assert sampled_accuracy(model, tok, right + wrong, cold) == 0.5
    with pytest.raises(ValueError, match="temperature above 0"):
        sampled_completions(model, tok, prompts, Sampling(2, 0.0, 1.0, 0))


@pytest.mark.slow
def test_mapo_eval_reports_sampled_and_out_of_domain_accuracy(
    tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli import main

    monkeypatch.delenv("MAPO__ROLLOUT__EVAL_SAMPLES", raising=False)
    assert main(["eval", str(tiny_model), "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert "/12 arithmetic problems, greedy" in out
    assert "sampled accuracy" in out and "mean of 4 samples per problem at temperature 0.5" in out
    assert "out-of-domain accuracy" in out and "(12 arithmetic problems, greedy); sampled" in out


@pytest.mark.slow
def test_a_run_that_started_from_model_path_is_an_eval_target(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`mapo compare` runs start from the shared warm start: their run directory holds the
    weights and a config.toml naming the model, but no model/ of its own."""
    from services.stack.evaluate import load_policy, resolve_target
    from services.weights.store import write_version

    model, _ = load_policy(tiny_model)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    run = tmp_path / "runs" / "mapo-seed-0"
    version, _ = write_version(run / "weights", 3, tensors)
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_target(run, tiny_model)  # weights alone are not a run directory
    (run / "config.toml").write_text(f'[model]\npath = "{tiny_model}"\n')
    target = resolve_target(run, tiny_model)
    assert (target.model_dir, target.version_dir) == (tiny_model, version)
