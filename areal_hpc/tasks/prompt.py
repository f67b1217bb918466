"""A problem as the policy's input ids: through the checkpoint's chat template, or as raw text.

One builder serves the rollout workers and the evaluator, so the model is evaluated on exactly the
prompts it is trained on. A dataset that stores whole conversations (``Problem.messages``) is used as it
is, with the configured system message added only when the conversation has none.
"""

from __future__ import annotations

from areal_hpc.config.prompt import PromptConfig
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.tasks.base import Problem


class PromptBuilder:
    def __init__(self, cfg: PromptConfig, tokenizer: Tokenizer) -> None:
        fmt = cfg.format
        if fmt == "auto":
            fmt = "chat" if tokenizer.chat_template else "raw"
        if fmt == "chat" and not tokenizer.chat_template:
            raise ValueError("prompt.format=chat but the checkpoint's tokenizer has no chat template (no chat_template "
                             "in its tokenizer_config.json); set prompt.format=raw or use a chat checkpoint")
        self.format, self.cfg, self.tok = fmt, cfg, tokenizer

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The conversation a chat prompt is made of."""
        if problem.messages is not None:
            msgs = [{"role": r, "content": c} for r, c in problem.messages]
        else:
            msgs = [{"role": "user", "content": self.cfg.template.format(problem=problem.prompt)}]
        if self.cfg.system is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.cfg.system})
        return msgs

    def text(self, problem: Problem) -> str:
        """A raw prompt: the user message's text (a stored conversation's contents, one per line)."""
        if problem.messages is not None:
            return "\n".join(c for _, c in problem.messages)
        return self.cfg.template.format(problem=problem.prompt)

    def ids(self, problem: Problem) -> list[int]:
        if problem.prompt_tokens is not None:  # token-level tasks: the ids are the prompt
            return list(problem.prompt_tokens)
        if self.format == "chat":
            return self.tok.apply_chat(self.messages(problem))
        return self.tok.encode(self.text(problem))
