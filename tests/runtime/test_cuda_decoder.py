"""The Llama-shaped benchmark decoder: Llama-3-8B's parameter count, KV-cached decoding equal to the full
forward, equality with Hugging Face's Llama at a tiny size, and the GPU schemes on it."""

from __future__ import annotations

import pytest
import torch

from slimkit.runtime import cuda as rc
from slimkit.runtime.cuda_decoder import LLAMA3_8B, Decoder, DecoderConfig, count_params
from tests.conftest import sqnr_db

TINY = DecoderConfig(vocab=128, hidden=64, ffn=160, layers=2, heads=4, kv_heads=2)


def cuda_only(test):
    """Marked ``cuda`` and skipped where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def tiny() -> Decoder:
    torch.manual_seed(0)
    return Decoder(TINY).eval().requires_grad_(False)


def test_default_shape_is_llama_3_8b():
    assert count_params(LLAMA3_8B) == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert LLAMA3_8B.head_dim == 128 and LLAMA3_8B.heads // LLAMA3_8B.kv_heads == 4


def test_kv_cached_decoding_equals_the_full_forward():
    model = tiny()
    tokens = torch.randint(0, TINY.vocab, (2, 12))
    model.setup_cache(2, 16, torch.float32)
    full = model(tokens, torch.arange(12))  # (2, 12, V)
    model.setup_cache(2, 16, torch.float32)
    steps = [model(tokens[:, :8], torch.arange(8))]  # prefill 8, then one token at a time
    steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(8, 12)]
    assert float((torch.cat(steps, dim=1) - full).abs().max()) < 1e-5


def test_earlier_logits_ignore_later_tokens():
    model = tiny()
    a = torch.randint(0, TINY.vocab, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % TINY.vocab
    model.setup_cache(1, 10, torch.float32)
    la = model(a, torch.arange(10))
    model.setup_cache(1, 10, torch.float32)
    lb = model(b, torch.arange(10))
    assert float((la[:, :6] - lb[:, :6]).abs().max()) < 1e-6 and float((la[:, 6:] - lb[:, 6:]).abs().max()) > 1e-3


def test_running_without_a_cache_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup_cache"):
        tiny()(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_matches_hugging_face_llama_at_a_tiny_size():
    transformers = pytest.importorskip("transformers")
    model = tiny()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=TINY.vocab, hidden_size=TINY.hidden, intermediate_size=TINY.ffn, num_hidden_layers=TINY.layers,
        num_attention_heads=TINY.heads, num_key_value_heads=TINY.kv_heads, rope_theta=TINY.rope_theta,
        rms_norm_eps=TINY.norm_eps, tie_word_embeddings=False, max_position_embeddings=64)).eval()
    d = TINY.head_dim
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = blk.attn.wqkv.weight.split([TINY.heads * d, TINY.kv_heads * d, TINY.kv_heads * d])
        gate, up = blk.w13.weight.chunk(2)
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": blk.attn.wo.weight,
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": blk.w2.weight, p + "input_layernorm.weight": blk.attn_norm.weight,
                      p + "post_attention_layernorm.weight": blk.ffn_norm.weight})
    hf.load_state_dict(state, strict=True)
    tokens = torch.randint(0, TINY.vocab, (2, 12))
    model.setup_cache(2, 12, torch.float32)
    with torch.no_grad():
        assert float((hf(tokens).logits - model(tokens, torch.arange(12))).abs().max()) < 1e-4


# Logit SQNR of the tiny decoder under each scheme against fp32 (int4 uses groups of 32).
DECODER_SQNR = {"bf16": 35.0, "int8": 25.0, "fp8": 20.0, "int4": 14.0}


@pytest.mark.parametrize(("scheme", "floor"), DECODER_SQNR.items())
def test_every_projection_converts_and_logits_track_fp32_on_cpu(scheme, floor):
    from slimkit.runtime.cuda_kernels import _cpu_fp8_blocker

    if scheme == "fp8" and _cpu_fp8_blocker() is not None:
        pytest.skip(_cpu_fp8_blocker())
    model = tiny()
    tokens = torch.randint(0, TINY.vocab, (2, 8))
    model.setup_cache(2, 8, torch.float32)
    ref = model(tokens, torch.arange(8))
    built = rc.build_cuda(model, scheme, device="cpu", group_size=32)
    assert built.skips == [] and len(built.layers) == 4 * TINY.layers + 1  # wqkv, wo, w13, w2 per layer + output
    built.model.setup_cache(2, 8)
    assert sqnr_db(ref, built(tokens, torch.arange(8)).float()) > floor


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_one_compiled_layer_serves_every_layer_and_keeps_the_cache_writes(scheme):
    """What the decode benchmark relies on: one graph for all layers (no per-layer recompiles), with each
    layer's KV-cache write inside it (aot_eager: the same tracing and functionalization as inductor)."""
    import torch._dynamo
    import torch._dynamo.testing

    from slimkit.runtime.cuda_decoder import run_block

    built = rc.build_cuda(tiny(), scheme, device="cpu", group_size=32)
    model = built.model
    tokens, pos = torch.randint(0, TINY.vocab, (2, 1)), torch.tensor([3])
    with torch.inference_mode():
        model.setup_cache(2, 8)
        eager = model(tokens, pos)
        eager_cache = model.layers[1].attn.k_cache.clone()
        model.setup_cache(2, 8)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        model.block_fn = torch.compile(run_block, backend=counter, fullgraph=True, dynamic=False)
        compiled = model(tokens, pos)
    assert counter.frame_count == 1  # TINY has 2 layers: the second reuses the first one's graph
    assert torch.equal(compiled, eager) and torch.equal(model.layers[1].attn.k_cache, eager_cache)


@cuda_only
def test_graph_captured_decode_step_equals_eager_on_gpu():
    from slimkit.measure.cuda_profile import graphed

    dev = torch.device("cuda")
    built = rc.build_cuda(tiny(), "int4", group_size=32)
    model = built.model
    model.setup_cache(2, 16)
    tokens = torch.randint(0, TINY.vocab, (2, 1), device=dev)
    pos = torch.tensor([5], device=dev)
    with torch.inference_mode():
        eager = model(tokens, pos).clone()
        step = graphed(lambda: model(tokens, pos))
        assert step is not None
        assert sqnr_db(eager.float(), step().float()) > 40  # the same kernels, replayed


def test_attention_mask_is_built_once_per_step_as_an_additive_gqa_mask():
    from slimkit.runtime.cuda_decoder import attention_mask

    key_pos, pos = torch.arange(6), torch.tensor([2, 3])  # two query positions, cache of 6
    mask = attention_mask(key_pos, pos, group=4, dtype=torch.bfloat16)
    assert mask.shape == (1, 1, 8, 6) and mask.dtype == torch.bfloat16
    allowed = (mask[0, 0] == 0).to(torch.int64)  # (G*T, Tmax): rows repeat every T queries
    assert allowed.sum(1).tolist() == [3, 4] * 4  # keys 0..pos for each query row
    assert torch.isinf(mask[0, 0, 0, 3:]).all()


def test_written_out_decode_attention_equals_sdpa():
    from slimkit.runtime.cuda_decoder import DECODE_ROWS, attend, attention_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)  # 4 query heads / KV head
    mask = attention_mask(torch.arange(10), torch.tensor([4, 7]), group=4, dtype=torch.float32)  # (1, 1, 8, 10)
    assert q.shape[-2] <= DECODE_ROWS  # the written-out path
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (attend(q, k, v, mask) - reference).abs().max() < 1e-5
