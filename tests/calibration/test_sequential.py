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
        assert cls(batch_size=3, block_path="model.layers").runner_kwargs() == {
            "block_path": "model.layers", "device": None, "progress": False, "batch_size": 3}
        with pytest.raises(ValueError, match=rf"{cls.__name__}.batch_size=0 must be an int >= 1"):
            cls(batch_size=0)
        with pytest.raises(TypeError, match=rf"{cls.__name__}.progress must be True or False"):
            cls(progress="yes")
