import pytest
import torch

from lightning_quant import testing
from lightning_quant.calibration import run_sequential
from lightning_quant.targets import linear_weight, select_linears


def test_block_inputs_match_the_models_hidden_states(tiny_model):
    ids = torch.cat(testing.random_token_batches(3, 16, 2))
    ref = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = {}

    def record(ctx):
        seen[ctx.index] = torch.cat([i.hidden for i in ctx.inputs])

    rep = run_sequential(tiny_model, ids, record, progress=False, batch_size=2)
    assert rep.num_blocks == 2 and rep.num_batches == 3 and rep.num_tokens == 6 * 16
    for i in range(2):
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-5, atol=1e-5)


def test_memory_accounting_one_set_of_activations():
    model = testing.tiny_llama(layers=4)
    batches = testing.random_token_batches(4, 16, 2)
    one_batch = 2 * 16 * 96 * 4
    peaks = []

    def process(ctx):
        outs = ctx.forward(keep_outputs=True)  # an AWQ-like float pass, counted by the ledger
        peaks.append(ctx.ledger.live_bytes)
        ctx.release(outs)

    rep = run_sequential(model, batches, process, progress=False)
    assert rep.activation_bytes == 4 * one_batch
    assert peaks == [2 * 4 * one_batch] * 4  # inputs + the kept outputs, never more
    # propagation replaces inputs in place: at most one extra batch is ever alive beyond that
    assert rep.peak_activation_bytes == 2 * 4 * one_batch
    rep2 = run_sequential(model, batches, lambda ctx: None, progress=False)
    assert rep2.peak_activation_bytes == 4 * one_batch + one_batch


def test_set_weight_propagates_then_restores(tiny_model):
    before = {n: linear_weight(m).detach().clone() for n, m in select_linears(tiny_model).items()}
    targets = select_linears(tiny_model)
    hidden1 = {}

    def zero_block0(ctx):
        if ctx.index == 0:
            for mod in ctx.linears(targets).values():
                ctx.set_weight(mod, torch.zeros_like(linear_weight(mod)))
        else:
            hidden1["x"] = ctx.inputs[0].hidden.clone()

    ids = testing.random_token_batches(1, 8, 1)
    run_sequential(tiny_model, ids, zero_block0, progress=False)
    for n, m in select_linears(tiny_model).items():
        assert torch.equal(linear_weight(m), before[n])
    ref = tiny_model(input_ids=ids[0], output_hidden_states=True).hidden_states
    # the next block saw the *modified* block 0's output, not the float one
    assert not torch.allclose(hidden1["x"], ref[1])
    if type(tiny_model).__name__ == "LlamaForCausalLM":  # no biases: zeroed block == identity on the residual
        torch.testing.assert_close(hidden1["x"], ref[0])


def test_float_stream_carries_the_float_models_hidden_states(tiny_model):
    """With float_stream=True every block's float_inputs are the float model's hidden states, although each
    processed block ran on (and propagated) zeroed weights; capture_inputs(of_float_model=True) sees the
    original weights, and the quantized stream is the modified model's as without the float stream."""
    targets = select_linears(tiny_model)
    ids = torch.cat(testing.random_token_batches(2, 16, 2))
    ref = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = {"float": {}, "quant": {}, "plain": {}, "rows": {}, "float rows": {}}

    def capture_last(ctx, key, of_float_model):  # the block's last linear: after every zeroed one
        name, mod = list(ctx.linears(targets).items())[-1]
        rows = []
        ctx.capture_inputs({name: mod}, lambda n, m, x: rows.append(x), of_float_model=of_float_model)
        seen[key][ctx.index] = torch.cat(rows)

    def zero(ctx, key):
        for mod in ctx.linears(targets).values():
            ctx.set_weight(mod, torch.zeros_like(linear_weight(mod)))
        seen[key][ctx.index] = torch.cat([i.hidden for i in ctx.inputs])

    def zero_then_look(ctx):
        zero(ctx, "quant")
        seen["float"][ctx.index] = torch.cat([i.hidden for i in ctx.float_inputs])
        capture_last(ctx, "float rows", True)

    run_sequential(tiny_model, ids, lambda ctx: capture_last(ctx, "rows", False), batch_size=2)  # float model
    run_sequential(tiny_model, ids, lambda ctx: zero(ctx, "plain"), batch_size=2)
    rep = run_sequential(tiny_model, ids, zero_then_look, batch_size=2, float_stream=True)
    assert rep.activation_bytes == 2 * ids.numel() * 96 * 4  # both streams counted
    for i in range(2):
        torch.testing.assert_close(seen["float"][i], ref[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["quant"][i], seen["plain"][i], rtol=0, atol=0)
        torch.testing.assert_close(seen["float rows"][i], seen["rows"][i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["quant"][1], ref[1])
    with pytest.raises(ValueError, match=r"needs the float stream: call run_sequential\(\.\.\., float_stream=True\)"):
        run_sequential(tiny_model, ids, lambda ctx: ctx.capture_inputs({}, print, of_float_model=True))


def test_padding_is_removed_from_linear_inputs():
    model = testing.tiny_llama()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    rows = []
    q = model.model.layers[0].self_attn.q_proj

    def process(ctx):
        if ctx.index == 0:
            with ctx.hook_linears({"q": q}, lambda n, m, x, y: rows.append(x.shape[0])):
                ctx.forward()

    run_sequential(model, [{"input_ids": ids, "attention_mask": mask}], process, progress=False)
    assert rows == [13]


def test_nan_activations_raise():
    model = testing.tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf activations at the output of block model.layers.0"):
        run_sequential(model, testing.random_token_batches(1, 8, 1), lambda ctx: None, progress=False)
    model = testing.tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf activations at the input of the first block"):
        run_sequential(model, testing.random_token_batches(1, 8, 1), lambda ctx: None, progress=False)


def test_true_sequential_groups(tiny_model):
    targets = select_linears(tiny_model)
    groups = {}

    def process(ctx):
        groups[ctx.index] = [[n.rsplit(".", 1)[-1] for n in g] for g in ctx.sequential_groups(ctx.linears(targets))]

    run_sequential(tiny_model, testing.random_token_batches(1, 8, 1), process, progress=False)
    expected = {
        "LlamaForCausalLM": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
        "GPT2LMHeadModel": [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
        "OPTForCausalLM": [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]],
    }[type(tiny_model).__name__]
    assert groups[0] == expected and groups[1] == expected


def test_progress_bar_and_block_path_override():
    model = testing.tiny_llama()
    names = []
    run_sequential(model, testing.random_token_batches(1, 8, 1), lambda ctx: names.append(ctx.name),
                   block_path="model.layers", progress=True)
    assert names == ["model.layers.0", "model.layers.1"]


def test_calibration_options_shared_by_method_configs():
    from lightning_quant.algorithms.awq import AWQConfig
    from lightning_quant.algorithms.gptq import GPTQConfig

    for cls in (GPTQConfig, AWQConfig):
        extra = {"float_stream": False} if cls is GPTQConfig else {}  # GPTQ's own: the float stream of GPTAQ
        assert cls(batch_size=3, block_path="model.layers").runner_kwargs() == {
            "block_path": "model.layers", "device": None, "progress": False, "batch_size": 3, **extra}
        with pytest.raises(ValueError, match=rf"{cls.__name__}.batch_size=0 must be an int >= 1"):
            cls(batch_size=0)
        with pytest.raises(TypeError, match=rf"{cls.__name__}.progress must be True or False"):
            cls(progress="yes")


def test_capture_inputs_equals_full_forward_and_stops_after_the_last_module(tiny_model):
    """Inputs seen by capture_inputs == those of hook_linears + forward (bit for bit, every batch), and
    after the first batch the block stops once the hooked modules have their inputs."""
    targets = select_linears(tiny_model)
    batches = testing.random_token_batches(3, 8, 2)

    def process(ctx):
        lin = ctx.linears(targets)
        first = dict(list(lin.items())[:1])  # q_proj / c_attn: the block's first linear
        last = dict(list(lin.items())[-1:])  # a module that runs after it
        full, early, later_calls = [], [], []
        with ctx.hook_linears(first, lambda n, m, x, y: full.append(x.clone())):
            ctx.forward()
        hook = next(iter(last.values())).register_forward_pre_hook(lambda m, a: later_calls.append(1))
        try:
            ctx.capture_inputs(first, lambda n, m, x: early.append(x.clone()))
        finally:
            hook.remove()
        assert len(full) == len(early) == 3 and all(torch.equal(a, b) for a, b in zip(full, early))
        assert len(later_calls) == 1  # only the first batch ran the whole block
        seen = []
        ctx.capture_inputs(lin, lambda n, m, x: seen.append(n))  # every linear: nothing to skip
        assert len(seen) == 3 * len(lin)

    run_sequential(tiny_model, batches, process, progress=False)


def test_capture_inputs_runs_whole_block_when_a_module_repeats():
    """A module called twice per forward: no early stop (its second input would be lost)."""
    from lightning_quant.calibration.capture import BlockInput
    from lightning_quant.calibration.sequential import BlockContext

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    block = Twice()
    inputs = [BlockInput(torch.randn(1, 3, 4)) for _ in range(2)]
    ctx = BlockContext(0, "blk", block, inputs, torch.device("cpu"), None)
    seen = []
    ctx.capture_inputs({"a": block.a, "b": block.b}, lambda n, m, x: seen.append(n))
    assert seen == ["a", "b", "a"] * 2

