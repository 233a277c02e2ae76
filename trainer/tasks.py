"""What a run trains on. A task owns its data (training and eval items), its prompts and reward (through its two
workflows: sampled training rollouts, greedy eval) and, where it has them, reference answers (the supervised warm
start's targets). `make_task(cfg, tokenizer)` is the one place a config becomes a task:

- `GSM8KTask`: env.name=gsm8k in-process: single-turn prompts scored by the GSM8K reward; GSM8K's worked answers are
  the warm start's targets.
- `AgentTask`: every other env, or any env behind env.url: multi-turn episodes (trainer/agent_workflow.py). The GSM8K
  family (gsm8k, gsm8k_tools) trains on the trainer's GSM8K rows; the other envs on their own rows (`{"index": i}`).
"""

from __future__ import annotations

import abc
from typing import Any

from rollout.api import SamplingParams
from trainer.api import Workflow
from trainer.config import Config, ConfigError, EnvConfig

GSM8K_FAMILY = ("gsm8k", "gsm8k_tools")  # envs whose dataset is a GSM8K JSONL file (the trainer's data files)


class Task(abc.ABC):
    def __init__(self, cfg: Config, tokenizer: Any, workflow: Workflow, eval_workflow: Workflow):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.workflow, self.eval_workflow = workflow, eval_workflow

    @abc.abstractmethod
    def items(self) -> tuple[list[dict], list[dict]]:
        """Training items (at most data.max_train_samples) and eval items (eval.num_samples; none when eval is off)."""

    def demonstrations(self, items: list[dict]) -> list[str]:
        """The completion the model should learn for each item (the supervised warm start)."""
        raise ConfigError(f"sft.steps > 0 needs reference answers; env {self.cfg.env.name!r} has none: set sft.steps=0")

    reports_reward: bool = False
    """Eval also logs the mean episode reward (envs whose reward is not just right or wrong)."""


class _GSM8KData:
    """The trainer's GSM8K rows (chat-template prompts) and their worked answers."""

    cfg: Config
    tokenizer: Any

    def items(self) -> tuple[list[dict], list[dict]]:
        from trainer.data import load_eval_items, load_train_items

        cfg = self.cfg
        return load_train_items(cfg, self.tokenizer), load_eval_items(cfg, self.tokenizer) if cfg.eval.every else []

    def demonstrations(self, items: list[dict]) -> list[str]:
        from env_servers.gsm8k import solution_text

        return [solution_text(item["answer"]) for item in items]


class GSM8KTask(_GSM8KData, Task):
    pass


class AgentTask(Task):
    reports_reward = True

    def items(self) -> tuple[list[dict], list[dict]]:
        items = env_items(self.workflow.make_env)
        eval_items = items[: self.cfg.eval.num_samples] if self.cfg.eval.every else []
        return items[: self.cfg.data.max_train_samples], eval_items


class GSM8KAgentTask(_GSM8KData, AgentTask):
    """gsm8k_tools, or gsm8k behind a server: episodes over the trainer's GSM8K rows."""

    reports_reward = False


def is_agent_env(env: EnvConfig) -> bool:
    """True when rollouts go through env slots (a multi-turn env, or any env on a server) rather than the
    single-turn in-process GSM8K scorer."""
    return env.name != "gsm8k" or env.url is not None


def make_task(cfg: Config, tokenizer: Any) -> Task:
    r = cfg.rollout
    train = SamplingParams(
        n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens
    )
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    if not is_agent_env(cfg.env):
        from trainer.workflow import SingleTurnWorkflow

        reward = cfg.env.format_reward
        return GSM8KTask(
            cfg, tokenizer, SingleTurnWorkflow(tokenizer, train, reward), SingleTurnWorkflow(tokenizer, greedy, reward)
        )
    from trainer.agent_workflow import make_agent_workflows

    kind = GSM8KAgentTask if cfg.env.name in GSM8K_FAMILY else AgentTask
    return kind(cfg, tokenizer, *make_agent_workflows(cfg, tokenizer, train, greedy))


def env_items(make_env) -> list[dict[str, int]]:
    """One item per row of the env's dataset, `[{"index": i} for i in range(len(env))]`. The size is asked of a slot
    made and closed for the purpose (a server reports it in /health once it has built a slot, and `RemoteEnv`
    creates one on construction)."""
    from env_servers.api import EnvError

    env = make_env()
    try:
        size = len(env)
    except EnvError as err:
        raise ConfigError(f"env: cannot learn the env's dataset size ({err}); an env server must report it") from None
    finally:
        env.close()
    if size < 1:
        raise ConfigError("env: the env's dataset is empty")
    return [{"index": i} for i in range(size)]
