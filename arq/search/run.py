"""The search loop: DDPG agent x quantization environment, with a log, the best policy and resume.

For each episode e = 0, 1, ...:

1. reset the environment; for each of its 2L steps ``a_t = agent.act(s_t, e)`` and step;
2. the last step quantizes, fine-tunes and scores the policy: reward R_e;
3. the agent stores the episode's transitions with R_e, after the warm-up each followed by
   one DDPG update (HAQ's order: the k-th update sees the episode's first k transitions);
4. one JSON line is appended to the log (``episode``, ``policy`` as HAQ's ``[[w, a], ...]``,
   ``layers`` names, ``bitops_share``, ``reward``, ``accuracy``, ``acr``, the float
   reference, ``time`` of the episode and ``elapsed`` since the start), flushed and
   fsync'ed; when R_e beats the best so far the policy is written to ``best_path``
   (``arq.quant.Policy`` JSON); then a checkpoint (agent state, best, log length) is
   replaced atomically.

``resume=True`` reloads the checkpoint, cuts the log back to the length it had at that
checkpoint, and continues: a resumed search produces the same episodes as one that was
never interrupted (every random choice is seeded and checkpointed).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from arq.quant.policy import Policy
from arq.search.agent import DDPGAgent, DDPGConfig
from arq.search.environment import QuantizationEnv
from arq.search.reward import REWARDS, IRSSettings

__all__ = ["SearchConfig", "SearchResult", "make_search", "load_checkpoint", "search", "search_fingerprint", "take"]

#: 2 since the agent follows HAQ's replay size (128 x layers), minibatches (distinct transitions) and
#: update order (after each stored transition); a version-1 agent continued under them would not
#: give the episodes of its own search, so such a checkpoint is refused.
CHECKPOINT_FORMAT_VERSION = 2


@dataclass
class SearchResult:
    """The outcome of :func:`search`: the best policy found and every episode's record."""

    best_policy: Policy | None
    best_reward: float
    best_episode: int
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _atomic_torch_save(obj: Any, path: str) -> None:
    temporary = f"{path}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _atomic_policy_save(policy: Policy, path: str) -> None:
    temporary = f"{path}.tmp"
    policy.save(temporary)
    os.replace(temporary, path)


def _read_log(path: str, length: int) -> list[dict]:
    with open(path, "rb") as handle:
        content = handle.read()
    if len(content) < length:
        raise ValueError(f"the search log {path} is shorter ({len(content)} bytes) than at the checkpoint "
                         f"({length} bytes): it was not written by this search")
    with open(path, "r+b") as handle:
        handle.truncate(length)
    return [json.loads(line) for line in content[:length].decode("utf-8").splitlines() if line.strip()]


def search(
    env: QuantizationEnv,
    agent: DDPGAgent,
    *,
    episodes: int,
    log_path: str | os.PathLike | None = None,
    best_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    fingerprint: Mapping[str, Any] | None = None,
    progress: bool = False,
    on_episode: Callable[[dict], None] | None = None,
    checkpoint_state: dict | None = None,
) -> SearchResult:
    """Run the search for ``episodes`` episodes in total (module docstring).

    Args:
        env: the environment (its evaluator decides the reward).
        agent: the DDPG agent.
        episodes: total episodes (a resumed search counts the ones already done).
        log_path: JSONL file, one line per episode (appended; must not exist unless resuming).
        best_path: where the best policy is written as it improves.
        checkpoint_path: where the agent and loop state are written after every episode.
        resume: continue from ``checkpoint_path``.
        fingerprint: settings that must match for a resume (model, budget, reward, ...).
        progress: a tqdm bar on stderr.
        on_episode: called with each episode's record.
        checkpoint_state: with ``resume``, what :func:`load_checkpoint` returned for ``checkpoint_path``
            and this ``fingerprint`` (callers that check a resume early pass it on instead of the file
            being read twice); None reads and checks the checkpoint here.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
    log_path = None if log_path is None else os.fspath(log_path)
    best_path = None if best_path is None else os.fspath(best_path)
    checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
    fingerprint = _json_ready(dict(fingerprint or {}))
    start_episode, records, elapsed_before = 0, [], 0.0
    best = SearchResult(None, float("-inf"), -1)

    if resume:
        state = checkpoint_state if checkpoint_state is not None else load_checkpoint(checkpoint_path, fingerprint)
        agent.load_state_dict(state["agent"])
        start_episode = int(state["episode"])
        elapsed_before = float(state["elapsed"])
        if state["best_strategy"]:
            best = SearchResult(Policy.from_haq(env.model, json.loads(state["best_strategy"])),
                                float(state["best_reward"]), int(state["best_episode"]))
            if best_path is not None:  # an episode after the checkpoint may have overwritten it
                _atomic_policy_save(best.best_policy, best_path)
        if log_path is not None:
            if os.path.exists(log_path):
                records = _read_log(log_path, int(state["log_bytes"]))
            elif int(state["log_bytes"]) > 0:
                raise FileNotFoundError(f"resume: the search log {log_path} is missing; the checkpoint's run had "
                                        f"written {int(state['log_bytes'])} bytes to its log (pass the same log)")
    else:
        for path in (log_path, checkpoint_path):
            if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
                raise FileExistsError(f"{path} exists: pass resume=True (--resume) to continue it, or delete it")
    for path in (log_path, best_path, checkpoint_path):
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    from tqdm import tqdm

    bar = tqdm(total=episodes, initial=start_episode, unit="episode", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for episode in range(start_episode, episodes):
            episode_start = time.perf_counter()
            # 1. one episode: two steps (weight bits, activation bits) per layer
            observation, _ = env.reset()
            transitions, terminated, info, reward = [], False, {}, 0.0
            while not terminated:
                action = agent.act(observation, episode)
                next_observation, reward, terminated, _, info = env.step([action])
                transitions.append((observation, action, next_observation, terminated))
                observation = next_observation
            # 2.-3. the final reward for every transition, each followed by one update after the warm-up
            agent.learn_episode(transitions, reward, episode)
            # 4. log, best policy, checkpoint
            policy: Policy = info["policy"]
            record = {
                "episode": episode,
                "policy": info["strategy"],
                "layers": list(env.layer_names),
                "bitops_share": info["bitops_share"],
                "reward": reward,
                "accuracy": info.get("accuracy"),
                "acr": info.get("acr"),
                "float_accuracy": info.get("float_accuracy"),
                "float_acr": info.get("float_acr"),
                "exploration_sigma": agent.exploration_sigma(episode),
                "time": time.perf_counter() - episode_start,
                "elapsed": elapsed_before + time.perf_counter() - started,
            }
            record = _json_ready(record)
            records.append(record)
            if reward > best.best_reward:
                best = SearchResult(policy, float(reward), episode)
                if best_path is not None:
                    _atomic_policy_save(policy, best_path)
            log_bytes = 0
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    log_bytes = log.tell()
            if checkpoint_path is not None:
                _atomic_torch_save({
                    "format_version": CHECKPOINT_FORMAT_VERSION,
                    "episode": episode + 1,
                    "agent": agent.state_dict(),
                    "best_strategy": json.dumps(best.best_policy.to_haq(env.model)) if best.best_policy else "",
                    "best_reward": best.best_reward,
                    "best_episode": best.best_episode,
                    "elapsed": record["elapsed"],
                    "log_bytes": log_bytes,
                    "fingerprint": json.dumps(fingerprint, sort_keys=True),
                }, checkpoint_path)
            if on_episode is not None:
                on_episode(record)
            bar.update(1)
            bar.set_postfix(reward=f"{reward:.3f}", best=f"{best.best_reward:.3f}")
    finally:
        bar.close()
    best.records = records
    best.seconds = elapsed_before + time.perf_counter() - started
    return best


def search_fingerprint(model: str, dataset: str, config: SearchConfig, model_weights: str | None = None) -> dict:
    """The settings a resumed search must share with its checkpoint: the model (its name and, given,
    ``model_weights``, a hash of its weights: a different model behind the same path is refused), the
    data set, the :class:`SearchConfig`, and how a candidate's clean accuracy is measured
    (``accuracy_execution``: as ``irs.candidate_execution`` says since 2026-11-29; before, always
    "as given", even where IRS ran the integer model)."""
    fingerprint = {"model": model, "dataset": dataset, **config.to_dict(),
                   "accuracy_execution": config.irs.candidate_execution}
    if model_weights is not None:
        fingerprint["model_weights"] = model_weights
    return fingerprint


def load_checkpoint(checkpoint_path: str | os.PathLike | None, fingerprint: Mapping[str, Any]) -> dict:
    """The state of the checkpoint a search resumes from, once its settings are checked against
    ``fingerprint`` (:func:`search_fingerprint`): raises FileNotFoundError when there is none and
    ValueError, naming the settings, when they differ. Cheap: callers check before the float model's
    certificates are built."""
    if checkpoint_path is None or not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path}")
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises RuntimeError, pickle errors, ...
        raise ValueError(f"resume: {checkpoint_path} is not a readable search checkpoint ({error})") from None
    if isinstance(state, dict) and state.get("format_version") == 1:
        raise ValueError(f"resume: {checkpoint_path} comes from an earlier version of the search agent (replay of 128 "
                         "x steps per episode, minibatches drawn with replacement, updates after the whole episode), "
                         "which this version cannot continue exactly: start a new search")
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{checkpoint_path}: unsupported checkpoint format {found!r}")
    fingerprint = _json_ready(dict(fingerprint))
    saved = _as_run_then(json.loads(state["fingerprint"]))
    if "model_weights" not in saved and "model_weights" in fingerprint:
        warnings.warn(f"resume: {checkpoint_path} predates the model's weight hash in the checkpoint, so it "
                      "cannot be checked that the model is the same", stacklevel=3)
        fingerprint.pop("model_weights")
    changed = _changed_settings(saved, fingerprint)
    if changed == ["accuracy_execution"] and not _reward_uses_accuracy(fingerprint):
        warnings.warn(f"resume: episodes before {int(state['episode'])} logged the clean accuracy of the "
                      f"candidate run {saved['accuracy_execution']!r}, later ones run "
                      f"{fingerprint['accuracy_execution']!r}; the reward does not use it", stacklevel=3)
    elif changed:
        why = ""
        if "accuracy_execution" in changed:
            why = (f" (the checkpoint's run measured each candidate's clean accuracy "
                   f"{saved.get('accuracy_execution')!r}, this one would measure it "
                   f"{fingerprint.get('accuracy_execution')!r}, and it enters the reward; a search started "
                   "before 2026-11-29 with candidate_execution 'auto' cannot be continued by this version: "
                   "start a new one)")
        elif "model_weights" in changed:
            why = " (the model's weights are not those the search started with)"
        raise ValueError(f"resume: settings differ from the checkpoint's in {changed}{why}; resume with the "
                         "options of the first run")
    return state


def _as_run_then(fingerprint: dict) -> dict:
    """A checkpoint's settings, with those added since it was written set to what its run did: before
    ``irs.candidate_execution`` existed, candidates were certified as their fake-quant models, and
    before ``accuracy_execution``, their clean accuracy was always the fake-quant model's."""
    irs = fingerprint.get("irs")
    if isinstance(irs, dict) and "candidate_execution" not in irs:
        fingerprint = {**fingerprint, "irs": {**irs, "candidate_execution": "as given"}}
    if isinstance(irs, dict) and "accuracy_execution" not in fingerprint:
        fingerprint = {**fingerprint, "accuracy_execution": "as given"}
    return fingerprint


def _reward_uses_accuracy(fingerprint: Mapping[str, Any]) -> bool:
    """Whether clean accuracy enters the reward: the "haq" reward, or "arq" with an accuracy weight."""
    return fingerprint.get("reward") != "arq" or float(fingerprint.get("accuracy_weight") or 0.0) != 0.0


def _changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ (``irs.candidate_execution``), sorted."""
    changed = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changed += _changed_settings(before, after, f"{prefix}{key}.")
        elif before != after:
            changed.append(f"{prefix}{key}")
    return changed


# ----------------------------------------------------------------------------- assembling a search
@dataclass
class SearchConfig:
    """Everything that defines a search (the CLI's options; a resume must repeat them).

    Args:
        reward: ``"arq"`` (IRS ACR relative to the float model) or ``"haq"`` (clean accuracy).
        budget: the largest BitOPs share of FP32 (0.015625 = uniform W4A4).
        min_bits, max_bits: the bit range of the actions.
        search_images: held-out images the reward is measured on: the last ones of the training split.
        train_images: the first images of the training split, for the brief fine-tuning.
        calibration_images: the first of those calibrate the activation ranges.
        finetune_steps: SGD steps of the brief fine-tuning under noise (0: calibration only).
        finetune_lr: its learning rate (HAQ: 1e-3).
        finetune_batch_size: its batch size.
        accuracy_weight: weight of clean accuracy in the ``"arq"`` reward.
        irs: how the ``"arq"`` reward certifies (f's CERTIFY once with n, each candidate with n_p).
        ddpg: the agent's hyperparameters (its seed seeds the search).
    """

    reward: str = "arq"
    budget: float = 0.015625
    min_bits: int = 2
    max_bits: int = 8
    search_images: int = 100
    train_images: int = 2000
    calibration_images: int = 256
    finetune_steps: int = 50
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 128
    accuracy_weight: float = 0.0
    irs: IRSSettings = field(default_factory=IRSSettings)
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        for name in ("search_images", "train_images", "calibration_images", "finetune_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if self.calibration_images > self.train_images:
            raise ValueError(f"calibration_images ({self.calibration_images}) must not exceed train_images "
                             f"({self.train_images})")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def take(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[len, C, H, W]`` and labels ``int64[len]`` of ``dataset`` at ``indices``."""
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    if hasattr(dataset, "get_batch"):
        images, labels = dataset.get_batch(indices)
        return images, torch.as_tensor(labels).long()
    items = [dataset[int(i)] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


def make_search(model: torch.nn.Module, train_set, config: SearchConfig, *, input_shape=None,
                cache=None) -> tuple[QuantizationEnv, DDPGAgent]:
    """The environment (with its :class:`~arq.search.reward.CandidateEvaluator`) and the agent of a search.

    ``train_set``: the training split (``(image, label)`` items). The search subset is its last
    ``config.search_images`` images (indices are the IRS noise counters), the fine-tuning set
    its first ``config.train_images``; the two must not overlap.
    """
    from arq.quant import FinetuneConfig
    from arq.search.reward import CandidateEvaluator

    total = len(train_set)
    if config.search_images + config.train_images > total:
        raise ValueError(f"search_images + train_images ({config.search_images} + {config.train_images}) exceed "
                         f"the {total} training images: the search subset must be held out")
    search_indices = list(range(total - config.search_images, total))
    search_images, search_labels = take(train_set, search_indices)
    train_images, train_labels = take(train_set, range(config.train_images))
    finetune = None
    if config.finetune_steps > 0:
        finetune = FinetuneConfig(epochs=max(1, -(-config.finetune_steps * config.finetune_batch_size
                                                   // config.train_images)),
                                  lr=config.finetune_lr, batch_size=config.finetune_batch_size,
                                  max_steps=config.finetune_steps, seed=config.ddpg.seed)
    evaluator = CandidateEvaluator(
        model, search_images, search_labels, search_indices=search_indices,
        calibration_images=train_images[:config.calibration_images],
        train_data=(train_images, train_labels) if finetune is not None else None,
        reward=config.reward, finetune=finetune, irs=config.irs, accuracy_weight=config.accuracy_weight,
        cache=cache,
    )
    env = QuantizationEnv(model, evaluator, input_shape=input_shape or tuple(search_images.shape[1:]),
                          budget=config.budget, min_bits=config.min_bits, max_bits=config.max_bits)
    agent = DDPGAgent(len(env.observation_space.low), len(env.layer_names), config.ddpg)
    return env, agent
