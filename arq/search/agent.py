"""DDPG (Lillicrap et al., ICLR 2016) with HAQ's settings (Wang et al., CVPR 2019), CleanRL style.

The agent picks one bit width per step of :class:`arq.search.QuantizationEnv`. HAQ's
variant of DDPG, read top to bottom in :class:`DDPGAgent`:

1. act: during the first ``warmup_episodes`` episodes a uniform random action in [0, 1];
   afterwards ``a ~ TruncatedNormal(mu(s), sigma_e)`` on [0, 1], ``mu`` the actor and
   ``sigma_e = 0.5 * 0.99^(episode - warmup_episodes)``.
2. observe: the episode's final reward R goes to every one of its transitions
   ``(s_t, a_t, R, s_{t+1}, done_t)`` (the reward is only known at the end).
3. update (after the warm-up, one after each transition is stored, :meth:`DDPGAgent.learn_episode`,
   as HAQ's loop interleaves them): a minibatch of 64 distinct transitions
   from the replay of ``128 x L`` transitions (L quantizable layers, HAQ's ``rmsize``: with two steps per layer,
   the last 64 episodes); the rewards minus a moving-average baseline
   ``b <- b + 0.5 (mean(r) - b)``; critic on ``y = r - b + gamma (1 - done) Q'(s', mu'(s'))``
   (gamma = 1) by MSE, actor on ``-Q(s, mu(s))``; soft targets ``theta' <- tau theta + (1 - tau) theta'``.

Actor ``s -> 300 -> 300 -> 1`` (ReLU, sigmoid out), critic ``(s, a) -> 300 (s and a projected
and summed) -> 300 -> 1`` (ReLU) as HAQ's. Seeded (network init, exploration, minibatches) and
resumable bit for bit from :meth:`DDPGAgent.state_dict`.

Where this differs from HAQ's code (``haq/rl_quantize.py``, ``lib/rl/ddpg.py``), on purpose:

* Warm-up. HAQ's loop acts randomly while ``episode <= warmup`` (21 episodes for ``--warmup 20``)
  and its first actor episode has ``sigma = 0.5 * 0.99``. Here the first ``warmup_episodes``
  episodes (0 .. 19) are random and episode 20 has ``sigma = 0.5``: the paper's 20 warm-up
  episodes and ``sigma = 0.5 * 0.99^(episode - warmup)`` read with 0-based episodes.
* Initialization. The last layers start in ``U(-init_w, init_w)``, ``init_w = 3e-3``, as in DDPG
  (Lillicrap et al., Sec. 7; the hidden layers keep PyTorch's fan-in uniform init, also theirs).
  HAQ's code takes ``init_w = 3e-3`` but never applies it, so its last layers keep PyTorch's
  default ``U(-1/sqrt(300), 1/sqrt(300))``; with DDPG's, ``mu(s)`` starts near 0.5 in every state.
* Memory layout. HAQ's keras-rl memory stores observations in sequence and appends one extra
  entry per episode (the last observation, so the terminal transition has an ``s'``); that entry
  is never sampled as a transition. Here each transition carries its ``s'``: the same transitions.
"""
from __future__ import annotations

import contextlib
import json
import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

__all__ = ["Actor", "Critic", "DDPGAgent", "DDPGConfig", "ReplayBuffer"]


@contextlib.contextmanager
def _one_thread():
    """The agent's networks run on one thread. They are 300 wide at batch 64: threads gain nothing,
    and with another process busy on a core every parallel region waited for a descheduled
    thread (ten updates took 7.3 s on 2 threads against 0.19 s on one, 2 cores with one busy).
    One thread also makes the agent's float32 sums, hence its trajectory, the same whatever
    thread count the search runs with."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class DDPGConfig:
    """DDPG hyperparameters; the defaults are HAQ's (``haq/lib/rl/ddpg.py`` and ``rl_quantize.py``)."""

    hidden: int = 300
    """width of the two hidden layers of the actor and of the critic"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor"""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic"""
    tau: float = 0.01
    """soft target update rate: theta' <- tau theta + (1 - tau) theta'"""
    discount: float = 1.0
    """gamma of the critic's target (HAQ: 1, every transition carries the final reward)"""
    batch_size: int = 64
    """transitions per gradient step"""
    replay_per_layer: int = 128
    """replay capacity per quantizable layer: ``replay_per_layer x L`` transitions (HAQ's ``rmsize``,
    128 x layers; with two steps per layer that is the last 64 episodes)"""
    warmup_episodes: int = 20
    """episodes of uniform random actions before the actor acts and learns"""
    exploration_sigma: float = 0.5
    """std of the truncated-normal exploration at the first episode after the warm-up"""
    exploration_decay: float = 0.99
    """factor on the exploration std per episode after the warm-up"""
    baseline_alpha: float = 0.5
    """step of the moving-average reward baseline b <- b + alpha (mean(r) - b)"""
    init_w: float = 3e-3
    """the last layers start in U(-init_w, init_w)"""
    seed: int = 0
    """seeds the network initialization, the exploration noise and the minibatch sampling"""

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_size", "replay_per_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("actor_lr", "critic_lr", "exploration_sigma", "init_w"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("tau", "exploration_decay", "baseline_alpha"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if self.warmup_episodes < 0:
            raise ValueError(f"warmup_episodes must be >= 0, got {self.warmup_episodes}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)


class Actor(nn.Module):
    """mu(s) in [0, 1]: ``s -> 300 -> 300 -> 1``, ReLU, sigmoid."""

    def __init__(self, obs_dim: int, hidden: int, init_w: float):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(obs_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)
        nn.init.uniform_(self.fc3.bias, -init_w, init_w)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc3(F.relu(self.fc2(F.relu(self.fc1(state))))))


class Critic(nn.Module):
    """Q(s, a): ``relu(W_s s + W_a a) -> 300 -> 1`` (HAQ's critic)."""

    def __init__(self, obs_dim: int, hidden: int, init_w: float):
        super().__init__()
        self.fc_state, self.fc_action = nn.Linear(obs_dim, hidden), nn.Linear(1, hidden)
        self.fc2, self.fc3 = nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)
        nn.init.uniform_(self.fc3.bias, -init_w, init_w)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc_state(state) + self.fc_action(action))
        return self.fc3(F.relu(self.fc2(hidden)))


class ReplayBuffer:
    """A ring of ``capacity`` transitions ``(s, a, r, s', done)`` in float32 tensors."""

    def __init__(self, capacity: int, obs_dim: int):
        self.capacity = capacity
        self.states = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, obs_dim)
        self.dones = torch.zeros(capacity, 1)
        self.position = 0
        self.size = 0

    def add(self, state, action: float, reward: float, next_state, done: bool) -> None:
        i = self.position
        self.states[i] = torch.as_tensor(state, dtype=torch.float32)
        self.actions[i, 0] = float(action)
        self.rewards[i, 0] = float(reward)
        self.next_states[i] = torch.as_tensor(next_state, dtype=torch.float32)
        self.dones[i, 0] = float(done)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int):
        """``batch_size`` transitions: distinct ones once the buffer holds that many, as HAQ's memory
        (keras-rl's ``SequentialMemory``) draws them; with replacement before."""
        if self.size >= batch_size:
            chosen = rng.choice(self.size, size=batch_size, replace=False)
        else:
            chosen = rng.integers(0, self.size, size=batch_size)
        index = torch.as_tensor(chosen, dtype=torch.long)
        return (self.states[index], self.actions[index], self.rewards[index],
                self.next_states[index], self.dones[index])

    def state_dict(self) -> dict:
        return {"states": self.states, "actions": self.actions, "rewards": self.rewards,
                "next_states": self.next_states, "dones": self.dones,
                "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, name).copy_(state[name])
        self.position, self.size = int(state["position"]), int(state["size"])


class DDPGAgent:
    """HAQ's DDPG (module docstring) for an environment over ``layers`` quantizable layers.

    Args:
        obs_dim: observation size (10 for :class:`~arq.search.QuantizationEnv`).
        layers: the environment's quantizable layers L (an episode has 2L steps); the replay
            holds ``config.replay_per_layer x L`` transitions, as HAQ's ``rmsize``.
        config: :class:`DDPGConfig`.
    """

    def __init__(self, obs_dim: int, layers: int, config: DDPGConfig | None = None):
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 1:
            raise ValueError(f"layers must be an integer >= 1 (the environment's quantizable layers), got {layers!r}")
        self.config = config = config or DDPGConfig()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)  # not torch.manual_seed: it reseeds CUDA too
            self.actor = Actor(obs_dim, config.hidden, config.init_w)
            self.critic = Critic(obs_dim, config.hidden, config.init_w)
            # the targets start as copies; their own initial draws stay off the caller's generator
            self.actor_target = Actor(obs_dim, config.hidden, config.init_w)
            self.critic_target = Critic(obs_dim, config.hidden, config.init_w)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.replay = ReplayBuffer(config.replay_per_layer * int(layers), obs_dim)
        self.rng = np.random.default_rng(config.seed)
        self.baseline: float | None = None

    # ---------------------------------------------------------------- 1. act
    def exploration_sigma(self, episode: int) -> float | None:
        """``0.5 * 0.99^(episode - warmup)`` after the warm-up; None during it (uniform actions)."""
        if episode < self.config.warmup_episodes:
            return None
        return self.config.exploration_sigma * self.config.exploration_decay ** (episode - self.config.warmup_episodes)

    def act(self, observation, episode: int) -> float:
        """The action in [0, 1] for ``observation`` in episode ``episode`` (0-based), with exploration."""
        sigma = self.exploration_sigma(episode)
        if sigma is None:
            return float(self.rng.uniform(0.0, 1.0))
        mu = self.greedy(observation)
        low, high = (0.0 - mu) / sigma, (1.0 - mu) / sigma
        return float(np.clip(stats.truncnorm.rvs(low, high, loc=mu, scale=sigma, random_state=self.rng), 0.0, 1.0))

    @torch.no_grad()
    def greedy(self, observation) -> float:
        """mu(s), the actor's action without exploration."""
        with _one_thread():
            return float(self.actor(torch.as_tensor(observation, dtype=torch.float32).unsqueeze(0))[0, 0])

    # ---------------------------------------------------------------- 2. observe
    def observe_episode(self, transitions, final_reward: float) -> None:
        """Store ``(s, a, s', done)`` of one episode, each with the episode's final reward, without
        updating (the search uses :meth:`learn_episode`, which interleaves the updates)."""
        for state, action, next_state, done in transitions:
            self.replay.add(state, action, final_reward, next_state, done)

    def learn_episode(self, transitions, final_reward: float, episode: int) -> None:
        """HAQ's end of episode ``episode`` (``rl_quantize.py``): each transition ``(s, a, s', done)`` is
        stored with the final reward and, once the warm-up is over, followed by one :meth:`update`, so
        the k-th update of an episode samples a replay holding its first k transitions."""
        learning = self.exploration_sigma(episode) is not None
        for transition in transitions:
            self.observe_episode([transition], final_reward)
            if learning:
                self.update()

    # ---------------------------------------------------------------- 3. update
    def update(self) -> tuple[float, float]:
        """One DDPG step on a minibatch; returns (critic loss, actor loss)."""
        with _one_thread():
            return self._update()

    def _update(self) -> tuple[float, float]:
        config = self.config
        states, actions, rewards, next_states, dones = self.replay.sample(self.rng, config.batch_size)
        # moving-average baseline on the batch's mean reward (HAQ)
        batch_mean = float(rewards.mean())
        self.baseline = batch_mean if self.baseline is None else \
            self.baseline + config.baseline_alpha * (batch_mean - self.baseline)
        rewards = rewards - self.baseline

        with torch.no_grad():
            target_q = self.critic_target(next_states, self.actor_target(next_states))
            y = rewards + config.discount * (1.0 - dones) * target_q
        critic_loss = F.mse_loss(self.critic(states, actions), y)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()

        with torch.no_grad():
            for network, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for parameter, target_parameter in zip(network.parameters(), target.parameters()):
                    target_parameter.mul_(1.0 - config.tau).add_(parameter, alpha=config.tau)
        return float(critic_loss.detach()), float(actor_loss.detach())

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (tensors, numbers and strings only)."""
        return {
            "config": json.dumps(self.config.to_dict()),
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "replay": self.replay.state_dict(),
            "rng": json.dumps(self.rng.bit_generator.state),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = json.loads(state["config"])
        if saved != self.config.to_dict():
            raise ValueError(f"the checkpoint's DDPG config {saved} differs from this agent's {self.config.to_dict()}")
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer",
                     "replay"):
            getattr(self, name).load_state_dict(state[name])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.baseline = state["baseline"]
