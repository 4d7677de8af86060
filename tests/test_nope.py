"""smollm3 (and llama4) skip RoPE in every 4th layer. patches/0002 records that per weight layer,
so a layer order keeps NoPE with its weights instead of applying it by execution position."""
from __future__ import annotations

import numpy as np
import pytest

from frankenllama import Llama
from frankenllama.order import override_keys
from helpers import raw_logits
from reference import reference_logits
from tiny_model import rewrite_gguf

SEQ = [1, 75, 108, 229, 153, 132, 119, 107, 104, 117]
NOPE = {3}  # (il + 1) % 4 == 0 in a 4-layer smollm3


@pytest.fixture(scope="module")
def smollm3(tiny, tmp_path_factory):
    return rewrite_gguf(tiny.path, tmp_path_factory.mktemp("smollm3") / "smollm3.gguf", arch="smollm3")


def _logits(path, order=None):
    return raw_logits(path, [SEQ], kv_overrides=override_keys("smollm3", order) if order else None, n_threads=1)[0]


def test_file_order_has_nope_in_the_last_layer(smollm3, tiny):
    got = _logits(smollm3)
    np.testing.assert_allclose(got, reference_logits(tiny, SEQ, nope_layers=NOPE), rtol=1e-4, atol=1e-4)
    assert np.abs(got - reference_logits(tiny, SEQ)).max() > 1e-2  # NoPE matters: the test can fail


@pytest.mark.parametrize("order", [[3, 0, 1, 2], [0, 3, 3, 1, 2], [2, 1, 0]])
def test_nope_follows_the_weights(smollm3, tiny, order):
    got = _logits(smollm3, order)
    follows = reference_logits(tiny, SEQ, layer_order=order, nope_layers=NOPE)
    np.testing.assert_allclose(got, follows, rtol=1e-4, atol=1e-4)
    by_position = {il for p, il in enumerate(order) if (p + 1) % 4 == 0}
    if by_position != NOPE & set(order):
        # NoPE chosen by position (the unpatched graph's rule) would give other logits
        positional = _positional_nope_logits(tiny, order)
        assert np.abs(got - positional).max() > 1e-2


def _positional_nope_logits(tiny, order):
    from reference import block, rms_norm

    x = tiny.token_embd[np.asarray(SEQ)].astype(np.float64)
    for p, il in enumerate(order):
        x = block(tiny, tiny.layers[il], x, False, rope=(p + 1) % 4 != 0)
    return rms_norm(x, tiny.output_norm, tiny.rms_eps) @ tiny.output.T.astype(np.float64)


def test_llama_api_accepts_smollm3_orders(smollm3):
    llm = Llama(str(smollm3), layer_order=[3, 0, 1, 2], verbose=False, n_ctx=32)
    assert llm.layer_order == [3, 0, 1, 2]
    llm.close()
