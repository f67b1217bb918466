"""``prompt``: how a problem becomes the policy's input."""

from __future__ import annotations

import string
from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class PromptConfig:
    """How a problem's text becomes the ids the policy sees."""

    format: str = setting(
        "auto",
        "chat: through the checkpoint's chat template (system message, then the user message); raw: the "
        "user message's text as it is (base models, the toy model); auto: chat when the tokenizer has a template",
        ("auto", "chat", "raw"),
    )
    system: str | None = setting(None, "chat: the system message; null sends none (the template's own default "
                                       "applies, e.g. SmolLM2's)")
    template: str = setting("{problem}", "the user message, with {problem} where the problem's text goes, e.g. "
                                         "'{problem}\\nGive the final answer after ####.'")

    def validate(self) -> None:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as e:
            fields = {f"<{e}>"}
        need(fields == {"problem"}, "prompt.template", self.template,
             "must contain {problem} and no other {field} (write {{ and }} for literal braces)",
             "e.g. set prompt.template='{problem}\\nGive the final answer after ####.'")
