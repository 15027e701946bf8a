"""MoM causal language model: pre-norm blocks of (MoM layer, SwiGLU MLP), recurrent cache, generation."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn

from mom_lit import model_card
from mom_lit.config import MoMConfig
from mom_lit.initialization import init_model
from mom_lit.layer import MoMLayer
from mom_lit.layout import sequence_ids
from mom_lit.fused import FusedRMSNorm, swiglu_mlp
from mom_lit.losses import (linear_cross_entropy, load_balancing_loss_global, load_balancing_loss_per_layer,
                            load_balancing_loss_per_sequence, load_fraction, router_z_loss, routing_entropy)
from mom_lit.plan import ExecutionPlan, PlanCache
from mom_lit.state import MoMCache


@dataclass
class MoMOutput:
    loss: torch.Tensor | None = None
    """Language-model loss plus the weighted auxiliary terms (when labels or targets are given)."""
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    """Unweighted load-balancing loss (1 = balanced); None without a router."""
    z_loss: torch.Tensor | None = None
    cache: MoMCache | None = None
    router_load: torch.Tensor | None = None
    """(num_layers, E) fraction of routed slots per memory, detached."""
    router_entropy: torch.Tensor | None = None
    """(num_layers,) mean per-token router entropy in nats, detached."""
    extras: dict = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None
    """(B, T, D) final normalised hidden states, the LM head's input."""
    _logits: torch.Tensor | None = field(default=None, repr=False)
    _head_weight: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """(B, T, vocab) logits. Without labels/targets they come from the forward; with them the loss is computed
        chunk by chunk without ever holding all logits, and they are computed here on first access instead (from
        ``hidden_states``, under the grad mode of that access)."""
        if self._logits is None:
            self._logits = F.linear(self.hidden_states, self._head_weight)
        return self._logits


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, compile: bool | None = None) -> torch.Tensor:
        # down(silu(gate) * up), keeping only the gate|up projection for the backward
        return swiglu_mlp(x, self.gate_up.weight, self.down.weight, compile)


class MoMBlock(nn.Module):
    def __init__(self, config: MoMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = FusedRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MoMLayer(config, layer_idx)
        self.mlp_norm = FusedRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_hidden_size)

    def forward(self, x, seq_id, num_sequences, state=None, use_cache=False, plan=None):
        compile = plan.blocks == "compiled" if plan is not None else None
        h, aux = self.attn(self.attn_norm(x, compile), seq_id, num_sequences, state, use_cache, plan=plan)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x, compile), compile)
        return x, aux


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device.type == "cpu":  # checking values of a device tensor would stall the GPU
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the input length {total}, "
                             f"got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")


def _check_targets(name: str, values: torch.Tensor, vocab_size: int) -> None:
    """Labels (or targets) are integer ids in [0, vocab_size) or -100 (ignored).

    The values are read only on the CPU and outside ``torch.compile``: on a GPU reading them would stall the
    device every step (the training data path checks its ids on the host before the batch is moved).
    """
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {values.dtype}")
    if values.device.type != "cpu" or torch.compiler.is_compiling() or values.numel() == 0:
        return
    bad = (values != -100) & ((values < 0) | (values >= vocab_size))
    if bool(bad.any()):
        wrong = values[bad]
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}) or be -100 (ignored), got "
                         f"{wrong.numel()} value(s) outside it (min {int(wrong.min())}, max {int(wrong.max())})")


class MoMForCausalLM(nn.Module, ModelHubMixin, library_name=model_card.LIBRARY_NAME, license=model_card.LICENSE,
                     pipeline_tag=model_card.PIPELINE_TAG, tags=list(model_card.TAGS)):
    """The MoM causal language model.

    ``from_pretrained``, ``save_pretrained`` and ``push_to_hub`` follow Hugging Face conventions through
    ``huggingface_hub``'s ``ModelHubMixin``; the directory layout is described in :mod:`mom_lit.interop.hub`.
    """

    def __init__(self, config: MoMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([MoMBlock(config, i) for i in range(config.num_layers)])
        self.norm = FusedRMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.plans = PlanCache(config)

    def configure_paths(self, **overrides) -> None:
        """Choose the layers' paths for this model other than its config does, without changing the config:
        ``backend``, ``stages``, ``projections``, ``compile_stages``, ``chunk_size`` (as the MoMConfig fields) and
        the explicit arguments of :func:`mom_lit.plan.resolve_plan` (launch settings, ``compile_blocks``). Call it
        before running the model (generation picks the eager scan on CPU, FSDP turns the compiled stages off); each
        call starts from the config again."""
        self.plans = PlanCache(self.config, **overrides)

    def plan_for(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ExecutionPlan:
        """The plan every layer follows on ``device`` computing in ``dtype`` (resolved once, then cached)."""
        return self.plans.get(device, dtype)

    def describe_paths(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
        """One line naming the implementation of every stage of the layers on ``device`` in ``dtype`` (default:
        the parameters')."""
        weight = self.embed.weight
        return self.plan_for(device or weight.device, dtype or weight.dtype).describe()

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter in place (:func:`mom_lit.initialization.init_model`)."""
        init_model(self)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    # Hugging Face Hub ---------------------------------------------------------------------------------------
    # ModelHubMixin.from_pretrained tells a local folder from a Hub repository id (whose config.json it fetches)
    # and calls _from_pretrained; saving and pushing take the tokenizer and dtype, which the mixin's do not.
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict | None = None, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> MoMForCausalLM:
        """Called by ``MoMForCausalLM.from_pretrained(model_id, dtype=None, device="cpu", revision=None,
        local_files_only=False, ...)``: a folder written by :meth:`save_pretrained` (or its earlier nested
        layout) or a Hub repository id. ``dtype`` None keeps the stored dtype. The model is in eval mode."""
        from mom_lit.interop.hub import download_pretrained, read_pretrained

        if config is not None and not isinstance(config, dict):
            raise ValueError("from_pretrained reads the model's config from config.json; to change it, build "
                             "MoMForCausalLM(config) and load the weights with load_state_dict")
        folder = download_pretrained(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                     local_files_only=local_files_only, token=token)
        model, _, _ = read_pretrained(folder, dtype, device)
        return model

    def save_pretrained(self, save_directory: str | Path, *, tokenizer: str | None = None,
                        dtype: torch.dtype | None = None, push_to_hub: bool = False, repo_id: str | None = None,
                        **push_to_hub_kwargs) -> Path:
        """Write ``config.json`` (flat), ``model.safetensors``, the tokenizer and a model card to ``save_directory``.

        Args:
            tokenizer: ``"byte"``, a ``tokenizer.json`` (or a folder holding one; copied in) or a Hub name.
            dtype: dtype of the written weights (default: as held).
            push_to_hub: also upload to ``repo_id`` (default: the folder's name) with :meth:`push_to_hub`.
        Returns the directory.
        """
        from mom_lit.interop.hub import write_pretrained

        if push_to_hub_kwargs and not push_to_hub:
            raise TypeError(f"save_pretrained got {sorted(push_to_hub_kwargs)}, arguments of push_to_hub, "
                            "without push_to_hub=True")
        directory = write_pretrained(self.config, self.state_dict(), save_directory, tokenizer=tokenizer, dtype=dtype)
        if push_to_hub:
            self.push_to_hub(repo_id or directory.name, tokenizer=tokenizer, dtype=dtype, **push_to_hub_kwargs)
        return directory

    def push_to_hub(self, repo_id: str, *, tokenizer: str | None = None, dtype: torch.dtype | None = None,
                    commit_message: str = "Upload MoMForCausalLM", private: bool | None = None,
                    token: str | None = None, branch: str | None = None, create_pr: bool | None = None,
                    api=None) -> str:
        """Save the model as :meth:`save_pretrained` does and upload the folder to the Hub repository ``repo_id``
        (created if missing) in one commit. ``api`` is the ``huggingface_hub.HfApi`` to use (default: one
        with ``token``). Returns the commit's URL."""
        from mom_lit.interop.hub import write_pretrained

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_pretrained(self.config, self.state_dict(), Path(tmp) / repo_id.split("/")[-1],
                                      tokenizer=tokenizer, dtype=dtype, model_id=repo_id)
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                     commit_message=commit_message, revision=branch, create_pr=create_pr)

    def generate_model_card(self, tokenizer: str | None = None, model_id: str = "path/to/this/folder") -> ModelCard:
        return model_card.render_model_card(self.config, self.num_parameters(), tokenizer, model_id)

    def empty_cache(self, num_sequences: int, device=None, dtype=torch.float32) -> MoMCache:
        device = device if device is not None else self.embed.weight.device
        return MoMCache([b.attn.empty_state(num_sequences, device, dtype) for b in self.blocks])

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: MoMCache | None = None,
        use_cache: bool = False,
        targets: torch.Tensor | None = None,
        plan: ExecutionPlan | None = None,
    ) -> MoMOutput:
        """Run the model.

        Args:
            input_ids: (B, T) token ids; with ``cu_seqlens``, (1, total) packed documents.
            labels: (B, T) ids of the same sequence (Hugging Face convention): position t is trained to predict
                ``labels[:, t+1]``; -100 is ignored. Across a packed-document boundary nothing is predicted.
            cu_seqlens: (N+1,) int offsets of N packed documents; no information crosses a boundary.
            cache: state from a previous call over the same N sequences (prefill, then decode).
            use_cache: return the updated state in ``output.cache``.
            targets: (B, T) already-shifted targets (``targets[:, t]`` is what position t predicts), -100 ignored;
                an alternative to ``labels`` for data pipelines that shift themselves.
            plan: the layers' paths (default: the model's plan for the device and compute dtype, see
                :meth:`configure_paths`).
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
        batch, seq_len = input_ids.shape
        if input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got min {lo} max {hi}")
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"with cu_seqlens, input_ids must have shape (1, total), got {tuple(input_ids.shape)}")
            _check_cu_seqlens(cu_seqlens, seq_len)
            num_sequences = cu_seqlens.numel() - 1
        else:
            num_sequences = batch
        if cache is not None and cache.num_sequences != num_sequences:
            raise ValueError(f"cache holds {cache.num_sequences} sequences but the input has {num_sequences}")
        if use_cache and cache is None:
            cache = self.empty_cache(num_sequences)

        seq_id = sequence_ids(batch, seq_len, cu_seqlens, input_ids.device)
        x = self.embed(input_ids)
        plan = plan if plan is not None else self.plans.for_input(x)
        routings, new_states = [], []
        for i, block in enumerate(self.blocks):
            state = cache.layers[i] if cache is not None else None
            x, aux = block(x, seq_id, num_sequences, state, use_cache, plan=plan)
            if aux.routing is not None:
                routings.append(aux.routing)
            new_states.append(aux.state)
        hidden = self.norm(x, plan.blocks == "compiled")
        with_loss = labels is not None or targets is not None
        out = MoMOutput(hidden_states=hidden, _head_weight=self.lm_head.weight,
                        _logits=None if with_loss else self.lm_head(hidden))
        if use_cache:
            out.cache = MoMCache(new_states, seen_tokens=cache.seen_tokens + seq_len)
        if routings:
            with torch.no_grad():
                out.router_load = torch.stack([load_fraction(r.memory, cfg.num_memories) for r in routings])
                out.router_entropy = torch.stack([routing_entropy(r) for r in routings])
            if cfg.aux_loss_type == "global":
                out.aux_loss = load_balancing_loss_global(routings, cfg.num_memories)
            elif cfg.aux_loss_type == "per_layer":
                out.aux_loss = load_balancing_loss_per_layer(routings, cfg.num_memories)
            else:
                out.aux_loss = load_balancing_loss_per_sequence(routings, seq_id, num_sequences, cfg.num_memories)
            if cfg.router_z_loss_coef > 0:
                out.z_loss = router_z_loss(routings)

        if labels is not None or targets is not None:
            _check_targets("labels" if labels is not None else "targets",
                           labels if labels is not None else targets, cfg.vocab_size)
            if targets is None:
                targets = self._shift_labels(labels, cu_seqlens)
            if targets.shape != input_ids.shape:
                raise ValueError(f"labels/targets must have shape {tuple(input_ids.shape)}, got {tuple(targets.shape)}")
            targets = targets.reshape(-1).long()
            # Mean over the positions that have a target; 0 (not NaN) when none has, e.g. a batch of 1-token docs.
            # Chunked and fused with the LM head: the (B*T, vocab) fp32 logits and their gradient never exist.
            total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets,
                                         compile=plan.blocks == "compiled")
            out.lm_loss = total / (targets != -100).sum().clamp(min=1)
            loss = out.lm_loss
            if out.aux_loss is not None and cfg.aux_loss_coef > 0:
                loss = loss + cfg.aux_loss_coef * out.aux_loss
            if out.z_loss is not None:
                loss = loss + cfg.router_z_loss_coef * out.z_loss
            out.loss = loss
        return out

    @staticmethod
    def _shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if cu_seqlens is not None:
            # The last token of a document has no next token in its document.
            ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.int64) - 1
            ends = ends[ends >= 0] if ends.device.type == "cpu" else ends.clamp(min=0)
            targets = targets.clone()
            targets[0].index_fill_(0, ends, -100)  # a scalar fill: indexed assignment copies -100 from the host
        return targets

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cache: MoMCache | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of each row of ``input_ids`` (B, T) with the recurrent cache.

        The prompt is consumed in one chunked forward; every new token then costs one O(1) recurrent step.
        ``temperature=0`` is greedy. Rows that produced ``eos_token_id`` keep emitting it. Returns (B, T + new).
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a (B, T) prompt of at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        out = self(input_ids, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            out = self(nxt[:, None], cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
        return torch.cat(tokens, dim=1)


def check_sampling_args(max_new_tokens: int | None, temperature: float, top_k: int | None, top_p: float | None,
                        prefix: str = "") -> None:
    """Refuse sampling arguments that cannot be honoured, naming the argument (``prefix`` + its name; ``"--"`` for a
    command line). ``max_new_tokens=None`` skips that argument (a single sampling step)."""
    def refuse(name: str, requirement: str, value) -> NoReturn:
        raise ValueError(f"{prefix}{name} must be {requirement}, got {value!r} ({type(value).__name__})")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_real(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if max_new_tokens is not None and not (is_int(max_new_tokens) and max_new_tokens >= 0):
        refuse("max_new_tokens", "an integer >= 0", max_new_tokens)
    if not (is_real(temperature) and temperature >= 0):
        refuse("temperature", "a finite number >= 0 (0 is greedy)", temperature)
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        refuse("top_k", "an integer >= 1 (or None: no top-k cut)", top_k)
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        refuse("top_p", "a number in (0, 1] (or None: no nucleus cut)", top_p)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) sampled ids (greedy when temperature is 0)."""
    check_sampling_args(None, temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
