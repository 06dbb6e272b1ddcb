"""torch.compile per block, switched on by the DeepSpeed JSON's "torch_compile" section: the
section's validation, and parity of loss and gradients with the eager model on CPU (inductor).
The engine and the trainer with it: tests/test_scale_out.py, tests/test_relaunch.py."""

from __future__ import annotations

import pytest
import torch

from argonne_ds.config import ArgonneConfig
from argonne_ds.engine.ds_config import ConfigError, compile_options
from argonne_ds.model.model import ArgonneModel, compile_blocks

CONFIG = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128,
              max_position_embeddings=64)


def test_the_section_is_checked_and_defaults_to_inductor() -> None:
    assert compile_options({}) is None
    assert compile_options({"torch_compile": {"enabled": False}}) is None
    assert compile_options({"torch_compile": {"enabled": True}}) == {
        "backend": "inductor", "mode": None, "dynamic": None, "fullgraph": False}
    with pytest.raises(ConfigError, match="torch_compile.backnd"):
        compile_options({"torch_compile": {"enabled": True, "backnd": "inductor"}})
    with pytest.raises(ConfigError, match="wrong type"):
        compile_options({"torch_compile": {"enabled": "yes"}})


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["keep", "recompute"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(checkpointing: bool) -> None:
    torch.manual_seed(0)
    eager = ArgonneModel(ArgonneConfig(**CONFIG))
    compiled = ArgonneModel(ArgonneConfig(**CONFIG))
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        m.gradient_checkpointing = checkpointing
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled, backend="inductor") == 2
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second call runs the cached graph
        x = torch.randint(0, 512, (2, 32), generator=g)
        y = torch.randint(0, 512, (2, 32), generator=g)
        losses = [m(x, labels=y).loss for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # the blocks really ran compiled, one graph shared by both blocks
    assert counters["stats"]["unique_graphs"] == 1
