"""lm-evaluation-harness model ``mom_lit``: evaluate a MoM checkpoint on any lm_eval task.

Importing this module registers the model name with lm_eval (``pip install "mom_lit[eval]"``). The command line
is ``mom-lit evaluate`` (also ``python -m mom_lit.eval``), which takes lm_eval's own arguments::

    mom-lit evaluate --model mom_lit \\
        --model_args checkpoint=runs/quickstart/version_0/checkpoints/last.ckpt \\
        --tasks lambada_openai,hellaswag --batch_size auto --output_path results/

From Python: ``import mom_lit.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="mom_lit", ...)``,
or pass a :class:`MoMEvalLM` instance as the model.

``--model_args`` (comma separated ``key=value``):

* ``checkpoint``: a Lightning ``.ckpt``, a mom_lit directory or an fla checkpoint directory (see
  :func:`mom_lit.interop.load_checkpoint`); ``pretrained`` is accepted as another name for it.
* ``tokenizer``: ``byte``, a ``tokenizer.json`` path or a cached hub name (default: the checkpoint's).
* ``dtype``: ``float32`` | ``bfloat16`` | ``float16`` (default bfloat16 on CUDA, float32 on CPU).
* ``backend``: scan backend, ``auto`` | ``triton`` | ``compiled`` | ``eager`` (default auto on CUDA, eager on CPU).
* ``max_batch_tokens``: token budget of one forward pass (default 4096). Requests are packed into one row with
  document boundaries (no padding); a longer request runs alone in chunks on the recurrent cache.
* ``add_bos_token``: start every context with ``prefix_token_id`` (default false: our training starts a document
  from the empty state; fla checkpoints trained with a BOS token want true).
* ``prefix_token_id``: the token an empty context starts from (default the tokenizer's end-of-document id).
* ``max_gen_toks``: default generation length when a task does not set one (256).

``--batch_size N`` caps the number of requests per forward pass (``auto``: only the token budget applies).
Scoring: ``loglikelihood`` scores the continuation's tokens after the context's; ``loglikelihood_rolling``
scores a whole document after ``prefix_token_id`` with its full context (a recurrent model has no window to
slide); ``generate_until`` prefills the prompts as one packed batch, then decodes one O(1) recurrent step per
token, stopping at the end-of-document token or at the first of the task's ``until`` strings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mom_lit.data.tokenizers import Tokenizer, load_tokenizer
from mom_lit.eval.scoring import pack_batches, score_continuations
from mom_lit.generate import sample_tokens
from mom_lit.model import MoMForCausalLM

__all__ = ["MODEL_NAME", "MoMEvalLM"]

MODEL_NAME = "mom_lit"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}

logger = logging.getLogger("mom_lit")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _batch_limit(batch_size: int | str | None, max_batch_size: int | None) -> int | None:
    """Requests per forward pass from lm_eval's ``batch_size`` (an int, ``"auto"`` or ``"auto:N"``)."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return max_batch_size
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size!r}")
    return size


@register_model(MODEL_NAME)
class MoMEvalLM(TemplateLM):
    """A :class:`~mom_lit.model.MoMForCausalLM` behind lm_eval's model interface (single process)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        tokenizer: str | Tokenizer | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_batch_tokens: int | str = 4096,
        add_bos_token: bool | str = False,
        prefix_token_id: int | str | None = None,
        max_gen_toks: int | str = 256,
        model: MoMForCausalLM | None = None,
    ) -> None:
        super().__init__()
        if sum(x is not None for x in (checkpoint, pretrained, model)) != 1:
            raise ValueError("give exactly one of checkpoint=..., pretrained=... (the same) or a model object")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line passes cuda:0 unless told otherwise, also on machines without a GPU.
            if device is not None:
                logger.warning("mom_lit: %s requested but CUDA is not available; evaluating on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        recorded = None
        if model is None:
            from mom_lit.interop import load_checkpoint

            torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
            loaded = load_checkpoint(checkpoint or pretrained, dtype=torch_dtype, device=self._device)
            model, recorded = loaded.model, loaded.tokenizer
            backend = backend or ("auto" if self._device.type == "cuda" else "eager")  # eager: no compile wait
        else:
            model = model.to(self._device, DTYPES[dtype]) if dtype else model.to(self._device)
        self.model = model.eval()
        if backend is not None:
            self.model.configure_paths(backend=backend)
        self.tok = load_tokenizer(tokenizer if tokenizer is not None else (recorded or "byte"))
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer {self.tok.name!r} needs {self.tok.vocab_size} embedding rows but the model "
                             f"has vocab_size {self.model.config.vocab_size}: pass the tokenizer it was trained with")
        self.max_batch_tokens = int(max_batch_tokens)
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens!r}")
        self.batch_limit = _batch_limit(batch_size, max_batch_size)
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self._prefix = self.tok.eos_id if prefix_token_id is None else int(prefix_token_id)
        if not 0 <= self._prefix < self.model.config.vocab_size:
            raise ValueError(f"prefix_token_id {self._prefix} lies outside the vocabulary")
        self.max_gen_toks = int(max_gen_toks)

    # Tokenisation ------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tok.encode(string)
        if self.add_bos_token and add_special_tokens is not False:
            ids = [self._prefix, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # Scoring -------------------------------------------------------------------------------------------------------
    def _score(self, sequences: list[list[int]], counts: list[int], disable_tqdm: bool, desc: str):
        # Slices of the request list keep a progress bar moving; inside a slice the scorer packs longest-first.
        results = []
        step = 256
        for start in tqdm(range(0, len(sequences), step), desc=desc, disable=disable_tqdm or len(sequences) <= step):
            results += score_continuations(self.model, sequences[start:start + step], counts[start:start + step],
                                           self.max_batch_tokens, self.batch_limit)
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        sequences, counts = [], []
        for _, context, continuation in requests:
            context = context or [self._prefix]
            sequences.append(list(context) + list(continuation))
            counts.append(len(continuation))
        scores = self._score(sequences, counts, disable_tqdm, "mom_lit loglikelihood")
        answers = []
        for (key, _, _), score in zip(requests, scores):
            answer = (score.total, score.all_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        sequences, counts = [], []
        for (text,) in [req.args for req in requests]:
            ids = self.tok.encode(text)
            sequences.append([self._prefix, *ids])
            counts.append(len(ids))
        scores = self._score(sequences, counts, disable_tqdm, "mom_lit loglikelihood_rolling")
        answers = []
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, score.total)
            answers.append(score.total)
        return answers

    # Generation ----------------------------------------------------------------------------------------------------
    def _generation_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - _GEN_KEYS
        if unknown:
            logger.warning("mom_lit: ignoring generation arguments %s (supported: %s)", sorted(unknown),
                           sorted(_GEN_KEYS))
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = _as_bool(kwargs.get("do_sample", False), "do_sample")
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0))
        top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
        return {"until": until, "max_gen_toks": int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": temperature if sample else 0.0,
                "top_k": None if top_k is None else int(top_k), "top_p": None if top_p is None else float(top_p)}

    def _generate(self, prompts: list[list[int]], settings: dict[str, Any]) -> list[str]:
        until = settings["until"]
        generated: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        if settings["max_gen_toks"] > 0:
            steps = sample_tokens(self.model, prompts, settings["max_gen_toks"], settings["temperature"],
                                  settings["top_k"], settings["top_p"], eos_id=self.tok.eos_id)
            for step in steps:
                for row, token in enumerate(step):
                    if done[row]:
                        continue
                    if token is None or token == self.tok.eos_id:
                        done[row] = True
                        continue
                    generated[row].append(token)
                    texts[row] = self.tok.decode(generated[row])
                    done[row] = any(stop in texts[row] for stop in until)
                if all(done):
                    break
        # Cut each text at the earliest stop string it contains.
        return [min((t[:t.index(s)] for s in until if s in t), key=len, default=t) for t in texts]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="mom_lit generate_until", disable=disable_tqdm)
        for members in groups.values():
            settings = self._generation_settings(dict(requests[members[0]].args[1]))
            prompts = [self.tok_encode(requests[i].args[0]) or [self._prefix] for i in members]
            for batch in pack_batches([len(p) for p in prompts], self.max_batch_tokens, self.batch_limit):
                for b, text in zip(batch, self._generate([prompts[b] for b in batch], settings)):
                    i = members[b]
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return answers  # type: ignore[return-value]
