"""Fast paths of the MoM layer against its reference path: the layer with the Triton slot and mix stages (tested
on their own in ``test_slots.py`` and ``test_mix.py``), its precisions, activation memory and plan.

The kernels run natively on a GPU; on CPU the suite reruns this file under ``TRITON_INTERPRET=1`` in a fresh
process (the interpreter must be active before Triton is first used, see ``test_triton_interpreter.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the fast paths are Triton kernels (triton is not installed)")

from invariants import assert_model_invariants  # noqa: E402
from stage_cases import DEVICE, NATIVE, kernels, rel_err, routing  # noqa: E402

from mom_lit import MoMConfig, MoMForCausalLM, MoMLayer  # noqa: E402
from mom_lit.layout import build_layout, sequence_ids  # noqa: E402
from mom_lit.ops.slots.grouped import grouped_kernels_on, grouped_mm_available  # noqa: E402
from mom_lit.ops.stage_launch import DEFAULT_LAUNCH, StageLaunch  # noqa: E402
from mom_lit.plan import compute_dtype, resolve_plan, stage_kernels_build  # noqa: E402


@kernels
@pytest.mark.parametrize("rule,overrides,projections", [
    pytest.param("gated_delta", {}, "auto", id="gated_delta"),  # S / J = 5 / 3
    pytest.param("gated_delta", {}, "dense", id="gated_delta-dense"),  # every stream for every token
    # S / J = 4 / 2, on projection rows of 66 values padded to 80 (a multiple of 16 elements)
    pytest.param("delta", {"shared_memory": False}, "auto", id="delta-no-shared"),
    pytest.param("simple_gla", {"expand_v": 1.5}, "auto", id="simple_gla-K!=V"),
    pytest.param("gated_delta", {"num_memories": 8}, "auto", id="E8"),
    pytest.param("gated_delta", {"num_memories": 8}, "dense", id="E8-dense"),
    pytest.param("gated_delta", {"num_memories": 6, "topk": 1, "shared_memory": False}, "auto", id="E6-top1"),
])
def test_layer_with_slot_kernels_matches_reference_layer(rule, overrides, projections):
    """fp32: the selected streams' grouped projection on CPU (torch runs it in fp32 there; on CUDA it takes bf16
    only, see test_bf16_layer_against_fp32_reference), every stream's dense one on CUDA or when asked for. Under
    the interpreter the scan is the eager reference (the interpreted Triton scan is slow and not tested here)."""
    plan = _compare_layers(rule, torch.float32, {**overrides, "projections": projections}, tol=1e-4,
                           backend="triton" if NATIVE else "eager")
    assert plan.mix == "triton"
    assert plan.slots == ("grouped" if projections == "auto" and not NATIVE else "gathered")


@pytest.mark.skipif(not NATIVE, reason="bf16 end to end on the GPU")
@pytest.mark.parametrize("overrides,projections,grouped", [
    pytest.param({}, "auto", True, id="E4-grouped"),
    pytest.param({}, "dense", False, id="E4-dense"),
    pytest.param({"num_memories": 8}, "auto", True, id="E8-grouped"),
    pytest.param({"activation_memory": "balanced"}, "auto", True, id="E4-balanced-rebuilt-qkv"),
    pytest.param({"activation_memory": "lean"}, "auto", True, id="E4-lean-recomputed-projections"),
])
def test_bf16_layer_against_fp32_reference(overrides, projections, grouped):
    # 4 heads: per-stream rows of 2HK + 2H = 264 bf16 values, a multiple of 16 bytes as grouped_mm requires.
    plan = _compare_layers("gated_delta", torch.bfloat16, {**overrides, "projections": projections}, tol=5e-2,
                           hidden=128, heads=4, head_dim=32, stages="auto",
                           params=("q_proj.weight", "k_proj", "v_proj", "conv_weight", "o_proj.weight"))
    assert plan.slots in ("grouped", "gathered") and plan.mix == "triton"
    assert (plan.slots == "grouped") == (grouped and grouped_kernels_on(torch.device(DEVICE)))  # sm90 / sm100


@pytest.mark.skipif(not NATIVE, reason="bf16 autocast on the GPU")
@pytest.mark.parametrize("activation_memory", ["fast", "balanced", "lean"])
def test_mixed_precision_layer_against_fp32_reference(activation_memory):
    """fp32 weights under bf16 autocast (Lightning's ``bf16-mixed``): the projections run in bf16 from one cast of
    the input, so that the grouped product applies (recomputed with ``lean``) as with bf16 weights; the output and
    every gradient against the same layer in fp32 without autocast."""
    cfg = dict(hidden_size=128, num_heads=4, head_dim=32, num_memories=4, topk=2, shared_memory=True,
               backend="triton", num_layers=2)
    torch.manual_seed(0)
    mixed = MoMLayer(MoMConfig(**cfg, activation_memory=activation_memory)).to(DEVICE)
    ref = MoMLayer(MoMConfig(**cfg)).to(DEVICE)
    ref.load_state_dict(mixed.state_dict())
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 41, 128, generator=gen).to(DEVICE)
    seq_id = sequence_ids(2, 41, None, DEVICE)
    x_mixed, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_mixed = mixed(x_mixed, seq_id, 2)[0]
        plan = mixed.plans.for_input(x_mixed)
    out_ref = ref(x_ref, seq_id, 2)[0]
    assert rel_err(out_mixed, out_ref) < 5e-2
    grad = torch.randn(out_ref.shape, generator=gen).to(DEVICE)
    out_mixed.float().backward(grad)
    out_ref.backward(grad)
    assert rel_err(x_mixed.grad, x_ref.grad) < 5e-2
    for (name, p), q in zip(mixed.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        if name in ("q_proj.weight", "k_proj", "v_proj", "conv_weight", "o_proj.weight"):
            assert rel_err(p.grad, q.grad) < 5e-2, (name, rel_err(p.grad, q.grad))
    assert plan.dtype == torch.bfloat16 and plan.mix == "triton"
    assert plan.slots == ("grouped" if grouped_kernels_on(torch.device(DEVICE)) else "gathered")


@kernels
@pytest.mark.skipif(NATIVE, reason="the CPU (interpreter, fp16) twin of test_mixed_precision_layer_against_fp32_"
                                   "reference, which runs bf16 autocast on a GPU")
@pytest.mark.parametrize("activation_memory", ["fast", "lean"])
def test_autocast_layer_against_fp64_reference(activation_memory):
    """The mixed-precision path on CPU: fp32 weights under fp16 autocast (the interpreter cannot run bf16; the
    mechanism is the same), the grouped product asked for by an explicit plan (torch runs it in fp16 on CPU). The
    projections take autocast's dtype from one cast of the input (``lean`` recomputes them), and the output and
    gradients match the fp64 reference layer to fp16 precision."""
    cfg = dict(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, shared_memory=True,
               backend="triton", num_layers=2)
    torch.manual_seed(0)
    config = MoMConfig(**cfg, activation_memory=activation_memory, stages="triton")
    mixed = MoMLayer(config)
    plan = dataclasses.replace(resolve_plan(config, "cpu", torch.float16), slots="grouped")
    assert plan.mix == "triton" and plan.scan == "triton"
    ref = MoMLayer(MoMConfig(**{**cfg, "backend": "eager", "stages": "reference"})).double()
    ref.load_state_dict(mixed.state_dict())
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 37, 32, generator=gen)
    seq_id = sequence_ids(2, 37, None, "cpu")
    x_mixed, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out_mixed = mixed(x_mixed, seq_id, 2, plan=plan)[0]
    out_ref = ref(x_ref, seq_id, 2)[0]
    assert out_mixed.dtype == torch.float16
    assert rel_err(out_mixed, out_ref) < 5e-3
    grad = torch.randn(out_ref.shape, generator=gen)
    out_mixed.float().backward(grad)
    out_ref.backward(grad.double())
    assert rel_err(x_mixed.grad, x_ref.grad) < 5e-3
    for (name, p), q in zip(mixed.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, q.grad) < 5e-3, (name, rel_err(p.grad, q.grad))


@pytest.mark.parametrize("major,grouped", [(8, False), (9, True), (10, True), (12, False)])
def test_grouped_projections_only_where_torch_has_grouped_kernels(major, grouped, monkeypatch):
    """On other GPUs ``torch._grouped_mm`` loops over the groups after reading their sizes on the host (a
    synchronisation in every step): the dense product runs there instead."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert grouped_kernels_on(torch.device("cuda", 0)) == grouped
    assert grouped_kernels_on(torch.device("cpu"))


def test_an_unknown_projection_choice_is_reported():
    with pytest.raises(ValueError, match="MoMConfig.projections must be one of"):
        MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_layers=1, projections="sparse")


def test_projections_take_the_autocast_dtype():
    x = torch.randn(3, 8)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(torch.arange(3)) == torch.int64


def _compare_layers(rule, dtype, overrides, tol, hidden=32, heads=2, head_dim=16, params=None, backend="triton",
                    stages="triton"):
    """Fast layer in ``dtype`` against the reference layer in fp64 (fp32 on CUDA) with the same weights; returns
    the fast layer's plan."""
    cfg = {**dict(hidden_size=hidden, num_heads=heads, head_dim=head_dim, num_memories=4, topk=2,
                  shared_memory=True, update_rule=rule, backend=backend, num_layers=2), **overrides}
    torch.manual_seed(0)
    fast = MoMLayer(MoMConfig(**cfg, stages=stages)).to(DEVICE, dtype)
    ref_dtype = torch.float32 if NATIVE else torch.float64
    ref = MoMLayer(MoMConfig(**{**cfg, "backend": "eager", "stages": "reference"})).to(DEVICE, ref_dtype)
    ref.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(42)
    batch, seq_len = 2, 41
    x = torch.randn(batch, seq_len, hidden, generator=gen).to(DEVICE, dtype)
    seq_id = sequence_ids(batch, seq_len, None, DEVICE)
    x_fast, x_ref = x.clone().requires_grad_(), x.to(ref_dtype).requires_grad_()
    out_fast = fast(x_fast, seq_id, batch)[0]
    out_ref = ref(x_ref, seq_id, batch)[0]
    assert out_fast.dtype == dtype
    assert rel_err(out_fast, out_ref) < tol
    grad = torch.randn(out_ref.shape, generator=gen).to(DEVICE)
    out_fast.backward(grad.to(dtype))
    out_ref.backward(grad.to(ref_dtype))
    assert rel_err(x_fast.grad, x_ref.grad) < tol
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if params is None or name in params:
            assert rel_err(p.grad, q.grad) < tol, (name, rel_err(p.grad, q.grad))
    return fast.plans.for_input(x_fast)


@kernels
@torch.no_grad()
def test_model_invariants_with_slot_kernels():
    """The model on the default CUDA path (Triton scan + slot/mix stages): no output depends on future tokens, on
    other batch rows or on other packed documents, and prefill (reference stages: it writes a conv cache) +
    decoding equals the full forward."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(vocab_size=37, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                                     num_memories=4, topk=2, shared_memory=True, backend="triton",
                                     stages="triton")).to(DEVICE).eval()
    ids = torch.randint(0, 37, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_model_invariants(model, ids, cut=25, cu_seqlens=[0, 1, 17, 40], prefill=30, atol=1e-4)
    plan = model.plan_for(DEVICE)
    assert plan.slots in ("grouped", "gathered") and plan.mix == "triton", plan.describe()


def _saved_bytes_and_grads(layer, x, seq_id, batch):
    """Bytes of the distinct storages the forward saves for the backward, the output and every gradient."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x, seq_id, batch)[0]
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out))
    grads = {"x": x.grad, **{name: p.grad.clone() for name, p in layer.named_parameters()}}
    layer.zero_grad(set_to_none=True)
    return sum(storages.values()), out.detach(), grads


@kernels
@pytest.mark.parametrize("projections", ["auto", "dense"])
@pytest.mark.parametrize("rule", ["gated_delta", "simple_gla"])
def test_leaner_activation_memory_rebuilds_scan_inputs(rule, projections):
    """With ``activation_memory="balanced"`` the Triton scan keeps the slot stage's sources instead of its q, k, v and
    rebuilds W, U and the triangular inverses (delta rules) in its backward; ``lean`` also keeps none of the
    projections where the slot stage projects the selected streams only (grouped product). The same output and
    gradients, and exactly those bytes less saved."""
    batch, seq_len = 2, 37
    x = torch.randn(batch, seq_len, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seq_id = sequence_ids(batch, seq_len, None, DEVICE)
    results, grouped = {}, {}
    settings = ("fast", "balanced", "lean")
    for memory in settings:
        cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, shared_memory=True,
                        update_rule=rule, backend="triton", activation_memory=memory, stages="triton",
                        projections=projections)
        torch.manual_seed(0)  # the same weights for every setting
        layer = MoMLayer(cfg).to(DEVICE)
        results[memory] = _saved_bytes_and_grads(layer, x, seq_id, batch)
        grouped[memory] = layer.plans.for_input(x).slots == "grouped"
    row = layer._stream_weights(align=16).shape[1]
    # fp32: the grouped product runs on CPU, not on CUDA
    groups = projections == "auto" and grouped_mm_available(x.device, x.dtype, x.shape[-1], row)
    assert grouped == dict.fromkeys(settings, groups)
    kept, out, grads = results["fast"]
    tokens = batch * seq_len
    slots = tokens * 3  # top-2 + shared
    K, V, H, elt = cfg.head_dim, cfg.head_v_dim, cfg.num_heads, x.element_size()
    per_slot_and_head = 2 * K + V + (K + V if rule == "gated_delta" else 0)  # q, k, v (+ W, U)
    inverse = 64 * 4 if rule == "gated_delta" else 0  # the chunk's fp32 triangular inverse, one row per slot
    scan_bytes = slots * H * (per_slot_and_head * elt + inverse)
    # fast and balanced keep the selected streams' projections of every slot and the query projections; lean keeps
    # neither (all keep x, the weights and the group ends)
    projection_bytes = (slots * row + tokens * H * K) * elt if groups else 0
    for memory, saved_less in (("balanced", scan_bytes), ("lean", scan_bytes + projection_bytes)):
        kept_other, out_other, grads_other = results[memory]
        # Bit for bit where kernels run in order (the interpreter) and the products are the same; a GPU's atomic
        # reductions may reorder sums, and the grouped product sums the input and weight gradients in another
        # order.
        exact = not NATIVE and not (groups and memory == "lean")
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_other, out, **(dict(rtol=0, atol=0) if not NATIVE else tol))
        for name, grad in grads.items():
            torch.testing.assert_close(grads_other[name], grad, **tol,
                                       msg=lambda m, name=name, memory=memory: f"{memory} {name}: {m}")
        assert kept - kept_other == saved_less, memory


@kernels
@pytest.mark.parametrize("activation_memory", ["fast", "balanced", "lean"])
def test_first_forward_inside_an_activation_checkpoint(activation_memory, caplog):
    """The plan is resolved on the first forward, which may run inside a checkpointed block (FSDP recomputes every
    block, so the very first forward is checkpointed); the recompute must still match, and the gradients equal
    the plain ones (also when the scan rebuilds q, k, v from the slot stage's sources)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from mom_lit.model import MoMBlock

    cfg = MoMConfig(vocab_size=37, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, num_memories=4, topk=2,
                    shared_memory=True, backend="triton", activation_memory=activation_memory,
                    stages="auto" if NATIVE else "triton")
    torch.manual_seed(0)
    plain = MoMForCausalLM(cfg).to(DEVICE)
    checkpointed = MoMForCausalLM(cfg).to(DEVICE)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: isinstance(m, MoMBlock))
    ids = torch.randint(0, 37, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    with caplog.at_level("INFO", logger="mom_lit"):
        for model in (checkpointed, plain):  # the checkpointed model first: its forward resolves the plan
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
    for model in (checkpointed, plain):
        plan = model.plan_for(DEVICE)
        assert plan.slots in ("grouped", "gathered") and plan.mix == "triton", plan.describe()
    # the paths are logged once per model (and device and dtype), not per layer or call
    assert sum("MoM layer paths" in r.getMessage() for r in caplog.records) == 2
    torch.testing.assert_close(losses[0], losses[1])
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in checkpointed.named_parameters()}
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@kernels
def test_kernels_that_cannot_build_leave_the_reference_path():
    """Launch settings that Triton cannot build (rows per program must be a power of two): the trial run that
    ``resolve_plan`` does before choosing the Triton stages on CUDA reports failure with one warning."""
    cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, backend="triton")
    bad = dataclasses.replace(DEFAULT_LAUNCH, conv_fwd=StageLaunch(3, 2),
                              mix_fwd=StageLaunch(3, 2))
    with pytest.warns(RuntimeWarning, match="using the reference stages"):
        assert not stage_kernels_build(cfg, DEVICE, torch.float32, bad)
    assert stage_kernels_build(cfg, DEVICE, torch.float32)
    if NATIVE:
        plan = resolve_plan(cfg, DEVICE, torch.float32, stage_launch=bad)
        assert plan.slots == "compiled" and plan.mix == "torch"


def test_layout_rank_inverts_slot_order():
    gen = torch.Generator().manual_seed(42)
    memory = routing(50, 4, 2, gen)
    layout = build_layout(memory, sequence_ids(2, 25, None, "cpu"), 2, 5)
    assert torch.equal(layout.slot[layout.rank], torch.arange(150))
    assert torch.equal(layout.rank[layout.slot], torch.arange(150))


