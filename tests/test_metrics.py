import copy
import math

import pytest
import torch

from lightning_quant import QuantSpec, quantize_model
from lightning_quant.evaluation import layer_output_errors, perplexity
from lightning_quant.metrics import LayerQuantizationError


def test_layer_error_formula():
    m = LayerQuantizationError(["a", "b"])
    ref = torch.tensor([3.0, 4.0])
    m.update("a", ref, ref + torch.tensor([0.3, 0.4]))  # relative error 0.01, SQNR 20 dB
    m.update("b", ref, ref)
    m.update("b", ref, ref + torch.tensor([0.0, 5.0]))  # sums: err 25, ref 50
    out = m.compute()
    torch.testing.assert_close(out["relative_error"], torch.tensor([0.01, 0.5]))
    assert out["sqnr_db"][0].item() == pytest.approx(20.0, abs=1e-4)
    assert out["sqnr_db"][1].item() == pytest.approx(10 * math.log10(2), abs=1e-4)


def test_layer_error_bad_input():
    with pytest.raises(ValueError, match="at least one layer name"):
        LayerQuantizationError([])
    m = LayerQuantizationError(["a", "b"])
    with pytest.raises(KeyError, match="Unknown layer 'c'"):
        m.update("c", torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="differ in shape"):
        m.update("a", torch.ones(2), torch.ones(3))
    m.update("a", torch.ones(2), torch.ones(2))
    with pytest.raises(RuntimeError, match="No outputs were recorded for \\['b'\\]"):
        m.compute()


def test_perplexity_matches_cross_entropy(tiny_llama):
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert perplexity(tiny_llama, ids, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_layer_output_errors_ranks_bits(tiny_llama):
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rel = {}
    for bits in (8, 3):
        q = copy.deepcopy(tiny_llama)
        names = list(quantize_model(q, QuantSpec(bits, 32)))
        rel[bits] = layer_output_errors(tiny_llama, q, names, batches).compute()["relative_error"]
    assert (rel[8] < rel[3]).all() and (rel[8] > 0).all()
