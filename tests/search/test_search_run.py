"""The search end to end on the tiny model: rewards, reproducibility, resume, the JSONL log."""
from __future__ import annotations

import json

import pytest
import torch
from scipy import stats

from arq.quant import FinetuneConfig, Policy
from arq.search import CandidateEvaluator, DDPGAgent, DDPGConfig, IRSSettings, QuantizationEnv, search
from arq.search.budget import bitops_share
from arq.search.reward import arq_reward, haq_reward

BUDGET = 0.03


def make_evaluator(model, tiny, reward="arq", **kwargs):
    search_images, search_labels = tiny.tiny_data(9, 100)
    train = tiny.tiny_data(64, 200)
    return CandidateEvaluator(
        model, search_images, search_labels, search_indices=list(range(50, 59)),
        calibration_images=train[0][:32], train_data=train, reward=reward,
        finetune=FinetuneConfig(max_steps=2, batch_size=32, lr=1e-3),
        irs=IRSSettings(n=300, n0=20, n_p=60, batch_size=300), **kwargs,
    )


def make_search(model, tiny, reward="arq", seed=0):
    evaluator = make_evaluator(model, tiny, reward)
    env = QuantizationEnv(model, evaluator, input_shape=tiny.INPUT_SHAPE, budget=BUDGET)
    agent = DDPGAgent(10, len(env.layer_names), DDPGConfig(warmup_episodes=2, batch_size=8, hidden=16, seed=seed))
    return env, agent


def test_reward_formulas():
    assert haq_reward(0.91, 0.93) == pytest.approx(-0.2)  # 0.1 x (91 % - 93 %)
    assert arq_reward(0.45, 0.5) == pytest.approx(-1.0)  # 10 % less ACR
    assert arq_reward(0.45, 0.5, 0.91, 0.93, accuracy_weight=0.5) == pytest.approx(-1.1)
    with pytest.raises(ValueError, match="float_acr"):
        arq_reward(0.1, 0.0)


def test_evaluator_measures_against_the_float_model(tiny_model, tiny):
    evaluator = make_evaluator(tiny_model, tiny, "arq")
    reference = evaluator.reference()
    cache = evaluator.float_cache()
    labels = evaluator.search_labels.tolist()
    certified = sum(cache[i].radius for i, y in zip(range(50, 59), labels) if cache[i].prediction == y) / 9
    assert reference["float_certified_acr"] == pytest.approx(certified) and certified > 0.3
    # ACR_f: f itself through IRS with n_p = 60 samples, no disagreement: zeta = 1 - 0.001^(1/60)
    zeta = 1 - 0.001 ** (1 / 60)
    irs_radii = [0.25 * stats.norm.ppf(cache[i].p_lower - zeta - 2**-52 * 32) for i in range(50, 59)]
    assert reference["float_acr"] == pytest.approx(sum(irs_radii) / 9, rel=1e-9)
    assert reference["float_accuracy"] == 1.0
    high = evaluator(Policy.uniform(tiny_model, 8, 8))
    low = evaluator(Policy.uniform(tiny_model, 2, 2))
    assert high["reward"] == pytest.approx(
        arq_reward(high["acr"], reference["float_acr"], high["accuracy"], 1.0, 0.0))
    assert high["reward"] == pytest.approx(0.0, abs=1e-9)  # int8 agrees with f on every replayed sample
    assert low["acr"] <= high["acr"] + 1e-12 and low["accuracy"] <= high["accuracy"]
    seen = []
    custom = make_evaluator(tiny_model, tiny, lambda inputs: seen.append(inputs.accuracy) or 2 * inputs.acr())
    result = custom(Policy.uniform(tiny_model, 8, 8))
    assert result["reward"] == pytest.approx(2 * result["acr"]) and seen == [result["accuracy"]]
    with pytest.raises(ValueError, match="reward"):
        make_evaluator(tiny_model, tiny, "accuracy")


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in records]


def test_short_search_is_reproducible_and_resumable(tiny_model, tiny, tmp_path):
    env, straight_agent = make_search(tiny_model, tiny)
    agent = straight_agent
    first = search(env, agent, episodes=4, log_path=tmp_path / "a.jsonl", best_path=tmp_path / "a.json",
                   checkpoint_path=tmp_path / "a.pt")
    records = read_log(tmp_path / "a.jsonl")
    assert [r["episode"] for r in records] == [0, 1, 2, 3]
    assert all(r["bitops_share"] <= BUDGET for r in records)
    assert all(len(r["policy"]) == 3 and r["acr"] is not None for r in records)
    assert records[2]["exploration_sigma"] == 0.5 and records[0]["exploration_sigma"] is None
    best = max(records, key=lambda r: r["reward"])
    assert first.best_reward == best["reward"] and first.best_episode == best["episode"]
    saved = Policy.load(tmp_path / "a.json")
    assert saved.to_haq(tiny_model) == best["policy"]
    assert bitops_share(env.costs, saved.to_haq(tiny_model)) <= BUDGET

    # same seed, interrupted after 3 episodes (the first learning one: Adam moments, baseline and
    # targets in the checkpoint) and resumed: the same four episodes
    env, agent = make_search(tiny_model, tiny)
    search(env, agent, episodes=3, log_path=tmp_path / "b.jsonl", best_path=tmp_path / "b.json",
           checkpoint_path=tmp_path / "b.pt")
    env, agent = make_search(tiny_model, tiny)
    resumed = search(env, agent, episodes=4, log_path=tmp_path / "b.jsonl", best_path=tmp_path / "b.json",
                     checkpoint_path=tmp_path / "b.pt", resume=True)
    assert without_time(read_log(tmp_path / "b.jsonl")) == without_time(records)
    assert resumed.best_reward == first.best_reward
    # the policies hide small differences of the actions (bits, then the budget): the agent must
    # also end where the uninterrupted one did
    assert agent.baseline == straight_agent.baseline
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for a, b in zip(getattr(agent, name).parameters(), getattr(straight_agent, name).parameters()):
            assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="resume"):
        search(env, agent, episodes=4, log_path=tmp_path / "b.jsonl", checkpoint_path=tmp_path / "b.pt")


def test_each_update_follows_the_transition_it_stores_as_in_haqs_loop(tiny_model, tiny):
    """HAQ's rl_quantize.py stores a transition, then updates, transition by transition: the k-th
    update of a learning episode samples a replay that holds that episode's first k transitions."""
    env = QuantizationEnv(tiny_model, lambda policy: {"reward": -bitops_share(env.costs, policy.to_haq(tiny_model))},
                          input_shape=tiny.INPUT_SHAPE, budget=BUDGET)
    agent = DDPGAgent(10, len(env.layer_names), DDPGConfig(warmup_episodes=2, batch_size=8, hidden=16))
    sizes = []
    update = agent.update
    agent.update = lambda: sizes.append(agent.replay.size) or update()
    search(env, agent, episodes=4)
    steps = env.num_steps
    assert sizes == [episode * steps + k for episode in (2, 3) for k in range(1, steps + 1)]


def test_a_checkpoint_of_the_earlier_agent_is_refused_by_name(tiny_model, tiny, tmp_path):
    """Version-1 checkpoints hold an agent with twice HAQ's replay, minibatches with replacement and
    updates after the whole episode: continued by this agent they would not repeat their search."""
    env = QuantizationEnv(tiny_model, lambda policy: {"reward": 0.0}, input_shape=tiny.INPUT_SHAPE, budget=BUDGET)
    config = DDPGConfig(warmup_episodes=2, batch_size=8, hidden=16)
    search(env, DDPGAgent(10, 3, config), episodes=1, checkpoint_path=tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["format_version"] = 1
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="earlier version of the search agent.*start a new search"):
        search(env, DDPGAgent(10, 3, config), episodes=2, checkpoint_path=tmp_path / "c.pt", resume=True)


def test_another_seed_explores_differently(tiny_model, tiny, tmp_path):
    env, agent = make_search(tiny_model, tiny, reward="haq", seed=1)
    result = search(env, agent, episodes=2)
    other_env, other_agent = make_search(tiny_model, tiny, reward="haq", seed=2)
    other = search(other_env, other_agent, episodes=2)
    assert [r["policy"] for r in result.records] != [r["policy"] for r in other.records]
    assert all(r["acr"] is None and r["accuracy"] is not None for r in result.records)


@pytest.mark.parametrize("execution", ["auto", "as given"])
def test_candidates_are_certified_as_arq_certify_runs_them(tiny_model, tiny, monkeypatch, execution):
    """``irs.candidate_execution`` "auto" runs each candidate as ``arq.certify`` does (on CPU with
    ``arq._C``: its integer model, "cpp+int8"); "as given" as its fake-quant model."""
    import torch

    import arq.search.reward as reward_module
    from arq._ext import compiled_ops_available

    backends = []

    def spy(*args, **kwargs):
        certificates = certify_incremental(*args, **kwargs)
        backends.extend(c.backend for c in certificates)
        return certificates

    certify_incremental = reward_module.certify_incremental
    monkeypatch.setattr(reward_module, "certify_incremental", spy)
    evaluator = make_evaluator(tiny_model, tiny, "arq")
    evaluator.irs.candidate_execution = execution
    evaluator.reference()  # f itself through IRS (a float model: the noise backend alone)
    backends.clear()
    evaluator(Policy.uniform(tiny_model, 4, 4))
    if not compiled_ops_available():
        expected = {"torch"}
    elif execution == "auto" and "onednn" in torch.backends.quantized.supported_engines:
        expected = {"cpp+int8"}
    else:
        expected = {"cpp+fakequant"}
    assert len(backends) == 9 and set(backends) == expected  # the candidate on the nine search images
    with pytest.raises(ValueError, match="candidate_execution must be one of"):
        IRSSettings(candidate_execution="integer")


@pytest.mark.parametrize("execution", ["auto", "as given"])
def test_clean_accuracy_runs_the_candidate_as_its_irs_does(tiny_model, tiny, monkeypatch, execution):
    """The candidate's clean accuracy (the "haq" reward) follows ``irs.candidate_execution``: "auto" counts
    the integer model's top-1 on the search images (on CPU with ``arq._C``), "as given" the fake-quant one's."""
    import torch

    import arq.search.reward as reward_module
    from arq._ext import compiled_ops_available
    from arq.quant import to_integer

    tags = []

    def spy(*args, **kwargs):
        prepared, tag = prepare_model(*args, **kwargs)
        tags.append(tag)
        return prepared, tag

    prepare_model = reward_module.prepare_model
    monkeypatch.setattr(reward_module, "prepare_model", spy)
    evaluator = make_evaluator(tiny_model, tiny, "haq")
    evaluator.irs.candidate_execution = execution
    policy = Policy.uniform(tiny_model, 2, 2)
    evaluation = evaluator(policy)
    candidate = evaluator.quantize(policy)  # the same seeded fine-tuning: the same candidate
    images, labels = evaluator.search_images, evaluator.search_labels
    integer_ran = (execution == "auto" and compiled_ops_available()
                   and "onednn" in torch.backends.quantized.supported_engines)
    with torch.no_grad():
        model = to_integer(candidate) if integer_ran else candidate
        expected = float((model(images).argmax(dim=1) == labels).double().mean())
    assert evaluation["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert evaluation.reward == pytest.approx(haq_reward(expected, evaluation["float_accuracy"]), abs=1e-12)
    if integer_ran:
        assert tags == ["+int8"]
    elif execution == "auto":
        assert len(tags) == 1
    else:
        assert tags == []
    with pytest.raises(ValueError, match="execution must be one of"):
        evaluator.clean_accuracy(candidate, "integer")


def test_evaluator_refuses_a_cache_built_with_other_settings(tiny_model, tiny):
    """f's certificates are every reward's reference: a cache from another sigma, n, alpha or seed (or with
    fewer replayable predictions than n_p) is refused, naming what differs, even when it covers the images."""
    from arq.irs import build_cache

    evaluator = make_evaluator(tiny_model, tiny)
    other = build_cache(tiny_model, evaluator.search_images, sigma=0.5, n=100, n0=20, alpha=0.01, n_p=40, seed=5,
                        input_index=evaluator.search_indices, batch_size=100)
    evaluator = make_evaluator(tiny_model, tiny, cache=other)
    with pytest.raises(ValueError, match=r"sigma 0.5 \(settings: 0.25\).*n 100 .*alpha 0.01.*seed 5.*n_p 60"):
        evaluator.float_cache()
    good = make_evaluator(tiny_model, tiny).float_cache()
    assert make_evaluator(tiny_model, tiny, cache=good).float_cache() is good


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -1.0])
def test_evaluator_accuracy_weight_must_be_finite(tiny_model, tiny, weight):
    with pytest.raises(ValueError, match="accuracy_weight"):
        make_evaluator(tiny_model, tiny, accuracy_weight=weight)


def test_dqn_config_widths_must_be_integers():
    for name, value in (("hidden", 2.5), ("batch_size", 0), ("replay_per_layer", True)):
        with pytest.raises(ValueError, match=name):
            DDPGConfig(**{name: value})
