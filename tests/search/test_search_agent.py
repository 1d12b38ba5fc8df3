"""HAQ's DDPG (arq.search.agent): exploration schedule, seeding, learning, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from arq.search.agent import DDPGAgent, DDPGConfig


def test_defaults_are_haqs():
    config = DDPGConfig()
    assert (config.hidden, config.actor_lr, config.critic_lr, config.tau, config.batch_size) == (300, 1e-4, 1e-3, 0.01, 64)
    assert (config.replay_per_layer, config.warmup_episodes, config.exploration_sigma, config.exploration_decay) == \
        (128, 20, 0.5, 0.99)
    agent = DDPGAgent(10, 6, config)
    assert agent.replay.capacity == 128 * 6
    assert [agent.actor.fc1.out_features, agent.actor.fc2.out_features] == [300, 300]
    with pytest.raises(ValueError, match="tau"):
        DDPGConfig(tau=0.0)


def test_search_replay_holds_the_last_64_episodes_as_haqs_rmsize(tiny_model, tiny):
    """HAQ sizes the replay 128 x layers (rl_quantize.py: rmsize * len(quantizable_idx)), not 128 x steps:
    with two steps per layer it keeps the last 64 episodes."""
    from arq.search.run import SearchConfig, make_search

    images, labels = tiny.tiny_data(40, 7)
    train_set = list(zip(images, labels.tolist()))
    env, agent = make_search(tiny_model, train_set, SearchConfig(
        reward="haq", search_images=4, train_images=32, calibration_images=8, finetune_steps=0))
    layers = len(env.layer_names)
    assert (layers, env.num_steps) == (3, 6)
    observation = np.zeros(10, dtype=np.float32)
    for episode in range(65):
        steps = [(observation, 0.5, observation, t == env.num_steps - 1) for t in range(env.num_steps)]
        agent.observe_episode(steps, float(episode))
    kept = agent.replay.rewards[:agent.replay.size, 0]
    assert agent.replay.size == 128 * layers
    assert sorted(set(kept.tolist())) == [float(e) for e in range(1, 65)]  # episode 0 evicted, 64 kept
    with pytest.raises(ValueError, match="layers"):
        DDPGAgent(10, 0)


def test_minibatches_draw_distinct_transitions_once_the_replay_holds_a_batch():
    """HAQ's memory (keras-rl's SequentialMemory) draws a minibatch without replacement when it can:
    with replacement, 64 of 200 transitions repeat about 10 of them per batch."""
    agent = DDPGAgent(10, 100, DDPGConfig(batch_size=64, hidden=8))
    observation = np.zeros(10, dtype=np.float32)
    for i in range(200):
        agent.replay.add(observation, i / 1000, 0.0, observation, False)
    for _ in range(50):
        actions = agent.replay.sample(agent.rng, 64)[1][:, 0].tolist()
        assert len(set(actions)) == 64
    small = DDPGAgent(10, 1, DDPGConfig(batch_size=64, hidden=8))
    for i in range(5):  # fewer than a batch: drawn with replacement, as HAQ's memory then does
        small.replay.add(observation, i / 1000, 0.0, observation, False)
    assert len(small.replay.sample(small.rng, 64)[1]) == 64


def test_exploration_schedule_and_bounds():
    agent = DDPGAgent(10, 4, DDPGConfig(warmup_episodes=3, hidden=8))
    assert [agent.exploration_sigma(e) for e in range(3)] == [None] * 3
    assert agent.exploration_sigma(3) == 0.5 and agent.exploration_sigma(5) == pytest.approx(0.5 * 0.99**2)
    observation = np.full(10, 0.5, dtype=np.float32)
    warmup = [agent.act(observation, 0) for _ in range(600)]
    assert 0.0 <= min(warmup) and max(warmup) <= 1.0 and abs(np.mean(warmup) - 0.5) < 0.04
    mu = agent.greedy(observation)
    explored = np.array([agent.act(observation, 200) for _ in range(600)])  # sigma = 0.5 * 0.99^197 = 0.069
    assert explored.min() >= 0.0 and explored.max() <= 1.0
    assert abs(np.median(explored) - mu) < 0.01 and 0.05 < explored.std() < 0.08


def test_seeded_agents_act_alike_and_checkpoint_round_trips(tmp_path):
    def run(agent, episodes):
        actions = []
        for episode in range(episodes):
            states = np.random.default_rng(episode).uniform(size=(5, 10)).astype(np.float32)
            transitions = []
            for t in range(4):
                action = agent.act(states[t], episode)
                actions.append(action)
                transitions.append((states[t], action, states[t + 1], t == 3))
            agent.observe_episode(transitions, -abs(actions[-1] - 0.3))
            if agent.exploration_sigma(episode) is not None:
                for _ in transitions:
                    agent.update()
        return actions

    config = DDPGConfig(warmup_episodes=2, batch_size=8, hidden=16, seed=5)
    straight = run(DDPGAgent(10, 4, config), 6)
    first = DDPGAgent(10, 4, config)
    part = run(first, 3)
    torch.save(first.state_dict(), tmp_path / "agent.pt")
    second = DDPGAgent(10, 4, config)
    second.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    rest = []
    for episode in range(3, 6):  # continue where the first left off
        states = np.random.default_rng(episode).uniform(size=(5, 10)).astype(np.float32)
        transitions = []
        for t in range(4):
            action = second.act(states[t], episode)
            rest.append(action)
            transitions.append((states[t], action, states[t + 1], t == 3))
        second.observe_episode(transitions, -abs(rest[-1] - 0.3))
        for _ in transitions:
            second.update()
    assert part + rest == straight
    assert straight != run(DDPGAgent(10, 4, DDPGConfig(warmup_episodes=2, batch_size=8, hidden=16, seed=6)), 6)
    with pytest.raises(ValueError, match="DDPG config"):
        DDPGAgent(10, 4, DDPGConfig(hidden=16)).load_state_dict(first.state_dict())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_actor_learns_a_one_step_bandit(sign):
    """Reward ``sign * a`` in every state: the actor's mu(s) moves from 0.5 towards the better end."""
    agent = DDPGAgent(10, 1, DDPGConfig(warmup_episodes=10, batch_size=32, hidden=32, seed=0, actor_lr=1e-3))
    state = np.zeros(10, dtype=np.float32)
    before = agent.greedy(state)
    for episode in range(60):
        action = agent.act(state, episode)
        agent.observe_episode([(state, action, state, True)], sign * action)
        if episode >= 10:
            for _ in range(4):
                agent.update()
    after = agent.greedy(state)
    assert abs(before - 0.5) < 0.01
    assert (after > 0.8) if sign > 0 else (after < 0.2), after


def test_agent_construction_leaves_the_cuda_generators_alone(monkeypatch):
    def refuse(seed):
        raise AssertionError("seeding the agent reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    DDPGAgent(10, 4, DDPGConfig(seed=5))


def test_agent_construction_leaves_the_callers_cpu_generator_alone():
    torch.manual_seed(321)
    before = torch.get_rng_state()
    agent = DDPGAgent(10, 4, DDPGConfig(seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    for online, target in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
        for a, b in zip(online.state_dict().values(), target.state_dict().values()):
            assert torch.equal(a, b)


def _trained_agent(threads: int, seen: list) -> DDPGAgent:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        agent = DDPGAgent(10, 5, DDPGConfig(seed=3, warmup_episodes=0))
        agent.critic.register_forward_hook(lambda module, inputs, output: seen.append(torch.get_num_threads()))
        rng = np.random.default_rng(0)
        for episode in range(4):
            transitions = [(rng.random(10, dtype=np.float32), agent.act(rng.random(10, dtype=np.float32), episode),
                            rng.random(10, dtype=np.float32), step == 9) for step in range(10)]
            agent.learn_episode(transitions, float(rng.normal()), episode)
        assert torch.get_num_threads() == threads  # restored after every update
        return agent
    finally:
        torch.set_num_threads(previous)


def test_the_agent_learns_on_one_thread_whatever_the_search_runs_with():
    """Its networks are tiny: on 2 threads under load every op waited for a descheduled thread
    (40x slower). On one thread the trajectory is also the same for any thread count."""
    seen_one, seen_two = [], []
    one, two = _trained_agent(1, seen_one), _trained_agent(2, seen_two)
    assert seen_two and set(seen_two) == {1}
    for a, b in zip(one.state_dict()["actor"].values(), two.state_dict()["actor"].values()):
        assert torch.equal(a, b)
    assert one.baseline == two.baseline
