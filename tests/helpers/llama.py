"""llama.cpp's own OpenAI-compatible server (`llama-server`) as a child process on 127.0.0.1,
serving a tiny model this module writes itself: no network, no downloaded weights.

The model is a real 2-layer llama-architecture GGUF with a valid SentencePiece-style
vocabulary (the control tokens, the 256 byte tokens and one token per printable ASCII
character), whose weights make the next token depend only on the one before it: each token's
embedding is one-hot, the layers compute but write nothing back to the residual stream
(their output projections are zero), and the output matrix is a table of successors. With
a chat template that only concatenates the messages' contents, the reply is a fixed function
of the prompt's last character, so a test knows the text, its length and its finish reason
before the server sends them:

- a prompt ending in "?" is answered "Oh yes." and the end-of-sequence token (`stop`);
- a prompt ending in "~" is answered "z" forever, until max_tokens (`length`);
- any other prompt is answered nothing but the end-of-sequence token.

The server binary is built once by scripts/build-llama-server.sh (which caches it).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from server.dev import embedded
from tests.helpers.processes import answers, read_log, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server.sh"

ANSWER = "Oh yes."
"""The reply to a prompt ending in ASK."""
ASK = "?"
LOOP = "~"
"""A prompt ending in LOOP is answered LOOPED repeated until max_tokens."""
LOOPED = "z"

_UNK, _BOS, _EOS = 0, 1, 2
_SPACE = "\u2581"  # SentencePiece's word boundary: the token text for " "
_EMBED = 384  # at least the vocabulary size: every token's embedding is a one-hot vector
_HEADS = 6
_FFN = 1024
_LAYERS = 2
_CONTEXT = 16384
_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def _vocabulary() -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [_SPACE, *(chr(c) for c in range(0x21, 0x7F))]
    types += [gguf.TokenType.NORMAL] * (1 + 0x7F - 0x21)
    return tokens, [int(t) for t in types]


def _successors(tokens: list[str]) -> dict[int, int]:
    """The next token after each token: the end of sequence, but for the two chains."""
    index = {t: i for i, t in enumerate(tokens)}

    def token(char: str) -> int:
        return index[_SPACE if char == " " else char]

    following = dict.fromkeys(range(len(tokens)), _EOS)
    chain = [token(c) for c in ASK + ANSWER] + [_EOS]
    following.update(itertools.pairwise(chain))
    following[token(LOOP)] = following[token(LOOPED)] = token(LOOPED)
    return following


def write_model(path: Path, seed: int = 7) -> Path:
    """Write the tiny model (about 15 MB of float32) to `path`."""
    tokens, types = _vocabulary()
    vocab = len(tokens)
    assert vocab <= _EMBED
    rng = np.random.default_rng(seed)

    def noise(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("parley-test-bigram")
    writer.add_context_length(_CONTEXT)
    writer.add_embedding_length(_EMBED)
    writer.add_block_count(_LAYERS)
    writer.add_feed_forward_length(_FFN)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_HEADS)
    writer.add_rope_dimension_count(_EMBED // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(_UNK)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(_TEMPLATE)

    embedding = np.zeros((vocab, _EMBED), np.float32)
    embedding[np.arange(vocab), np.arange(vocab)] = 1.0
    output = np.zeros((vocab, _EMBED), np.float32)
    for current, following in _successors(tokens).items():
        output[following, current] = 5.0  # a logit of about 98 against 0 for every other
    writer.add_tensor("token_embd.weight", embedding)
    writer.add_tensor("output_norm.weight", np.ones(_EMBED, np.float32))
    writer.add_tensor("output.weight", output)
    for layer in range(_LAYERS):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(_EMBED, np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(f"{block}.{name}.weight", noise(_EMBED, _EMBED))
        writer.add_tensor(f"{block}.attn_output.weight", np.zeros((_EMBED, _EMBED), np.float32))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(_EMBED, np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", noise(_FFN, _EMBED))
        writer.add_tensor(f"{block}.ffn_up.weight", noise(_FFN, _EMBED))
        writer.add_tensor(f"{block}.ffn_down.weight", np.zeros((_EMBED, _FFN), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cached_binary() -> Path | None:
    """The llama-server that scripts/build-llama-server.sh built, if it did (it prints the
    path without building when the binary is there; PARLEY_LLAMA_SERVER names another)."""
    named = os.environ.get("PARLEY_LLAMA_SERVER")
    if named:
        return Path(named)
    cache = Path(os.environ.get("PARLEY_LLAMA_CACHE", Path.home() / ".cache" / "parley-llama"))
    found = sorted(cache.glob("b*/llama-server"))
    return found[-1] if found else None


@dataclass
class LlamaServer:
    """`llama-server` on a free port of 127.0.0.1, stopped only by its own PID."""

    binary: Path
    model: Path
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> LlamaServer:
        self.port = embedded.free_port()
        args = [
            str(self.binary), "--model", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--ctx-size", str(_CONTEXT), "--parallel", "1", "--threads", "1",
            "--jinja", "--metrics", "--slots", "--no-warmup", "--no-ui",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        healthy = functools.partial(answers, f"{self.url}/health")
        wait_until_up(self.proc, healthy, "llama-server", self._log_tail, timeout, pause=0.1)

    def _log_tail(self) -> str:
        return self.log()[-4000:]

    def log(self) -> str:
        return read_log(self.log_path)

    def slot(self) -> dict[str, Any]:
        """The server's one slot as GET /slots shows it: `is_processing`, the last task's
        `id_task` and its `next_token[0]` (`n_decoded`, `n_remain`)."""
        with urllib.request.urlopen(f"{self.url}/slots", timeout=5) as response:
            slots: list[dict[str, Any]] = json.loads(response.read())
        return slots[0]

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def missing_reason() -> str | None:
    """Why the llama-server test cannot run here, or None when it can."""
    binary = cached_binary()
    if binary is None or not binary.is_file():
        return (
            "llama.cpp's server is not built: run scripts/build-llama-server.sh once "
            "(15 to 30 minutes; .ci/run does it)"
        )
    if shutil.which(str(binary)) is None:
        return f"{binary} is not executable"
    return None
