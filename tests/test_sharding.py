"""Mesh construction, logical-axis rules, and global batches on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import test_utils as tu
from variator_jax import sharding
from variator_jax.t5 import init_t5, logical_axes


def test_make_mesh_fills_minus_one_and_can_use_fewer_devices():
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(-1, 2)
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh(1, 1).shape) == {"data": 1, "model": 1}
    assert sharding.make_mesh(1, 1).devices.size == 1


@pytest.mark.parametrize("data,model,match", [(3, -1, "do not split"), (16, 1, "needs 16"),
                                              (-1, -1, "at most one -1"), (0, 1, "positive")])
def test_make_mesh_rejects_bad_sizes(data, model, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(data, model)


def test_mesh_spec_rules_divisibility_and_single_use():
    mesh = sharding.make_mesh(4, 2)
    rules = sharding.DEFAULT_RULES
    assert sharding.mesh_spec(("embed", "mlp"), rules, (32, 64), mesh) == P(None, "model")
    # 7 does not split over 2 devices: that dim stays replicated instead of failing.
    assert sharding.mesh_spec(("embed", "mlp"), rules, (32, 7), mesh) == P()
    # One mesh axis per array: "vocab" takes model, "mlp" cannot take it again.
    assert sharding.mesh_spec(("vocab", "mlp"), rules, (8, 8), mesh) == P("model")
    fsdp = (("embed", "data"),) + rules
    assert sharding.mesh_spec(("embed", "mlp"), fsdp, (32, 64), mesh) == P("data", "model")
    with pytest.raises(ValueError, match="mesh axis"):
        sharding.mesh_spec(("embed",), (("embed", "tensor"),))


def test_backbone_shardings_follow_logical_axes():
    cfg = tu.tiny_t5()
    mesh = sharding.make_mesh(4, 2)
    shapes = jax.eval_shape(lambda: init_t5(jax.random.key(0), cfg))
    sh = sharding.tree_shardings(mesh, logical_axes(cfg), shapes, sharding.DEFAULT_RULES)
    ffn = sh["encoder"]["layers"]["layer_1"]["DenseReluDense"]  # Stacked: [layers, ...].
    assert ffn["wi_0"]["kernel"].spec == P(None, None, "model")  # [layers, embed, mlp]
    assert ffn["wo"]["kernel"].spec == P(None, "model")  # [layers, mlp, embed]
    assert sh["shared"]["embedding"].spec == P("model")  # [vocab, embed]; 384 % 2 == 0
    q = sh["encoder"]["layers"]["layer_0"]["SelfAttention"]["q"]["kernel"]
    assert q.spec == P(None, None, "model")  # [layers, embed, heads, kv]
    assert sh["encoder"]["final_layer_norm"]["weight"].spec == P()
    # Placing real values with these shardings gives each device its slice.
    backbone = sharding.put_global(jax.device_get(init_t5(jax.random.key(0), cfg)), sh)
    wi = backbone["encoder"]["layers"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"]
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 32, 32)}
    # FSDP: `embed` over data as well; each device holds 1/8 of the kernel.
    fsdp = sharding.tree_shardings(mesh, logical_axes(cfg), shapes,
                                   sharding.with_fsdp(sharding.DEFAULT_RULES))
    wi = fsdp["encoder"]["layers"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"]
    assert wi.spec == P(None, "data", "model")
    assert sharding.with_fsdp(sharding.with_fsdp(sharding.DEFAULT_RULES))[:2] == (
        ("embed", "data"), ("batch", "data"))


def test_global_batch_is_split_over_data():
    mesh = sharding.make_mesh(4, 2)
    assert sharding.data_shard(mesh) == (0, 1)  # One process feeds the whole batch.
    local = tu.fake_batch(8, 16, 4, num_labels=2)
    batch = sharding.global_batch(mesh, local, sharding.DEFAULT_RULES)
    ids = batch["input_ids"]
    assert ids.shape == (8, 16) and ids.sharding.spec == P("data")
    assert {s.data.shape for s in ids.addressable_shards} == {(2, 16)}
    np.testing.assert_array_equal(np.asarray(ids), local["input_ids"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
