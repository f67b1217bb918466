"""The fused decode attention (RoPE + cache write + split-K attention + combine) against plain torch.

On CPU the Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, read when the
kernels are defined, hence a subprocess), in float32: the interpreter's bf16 ``tl.dot`` is not
faithful. On a GPU the same checks run compiled, in bf16.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_kernel_matches_rope_write_and_sdpa_under_interpreter(triton_interpreter):
    out = triton_interpreter("-c", textwrap.dedent("""
        import torch
        from areal_hpc.rollout.fast.decode_kernel import check_against_reference
        cpu = torch.device("cpu")
        # Qwen2-0.5B's heads; chunk edges (63, 64, 65, 128), an empty prefix, the last cache row
        print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 1, 63, 64, 65, 128, 200)))
        print(check_against_reference(cpu, torch.float32, 4, 4, 16, lengths=(3, 0, 130)))  # no GQA, D=16
        print(check_against_reference(cpu, torch.float32, 12, 2, 128, lengths=(600, 5)))  # 10 chunks > SP=8
        # the norm folded in: row scale from the residual rows and the bias applied by the kernel
        print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 1, 64, 65, 200), fold=True))
        for chunk, warps in ((32, 2), (128, 4), (256, 8)):  # the other splits the engine may choose
            print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 31, 33, 129, 255, 300),
                                          chunk=chunk, num_warps=warps))
        # the pipelined loop: tile and chunk edges, a chunk start (256, 512), one past it, several chunks
        for chunk, block in ((256, 64), (128, 32)):
            print(check_against_reference(cpu, torch.float32, 14, 2, 64,
                                          lengths=(0, 1, 63, 64, 65, 255, 256, 257, 300, 511, 512, 700),
                                          chunk=chunk, num_warps=4, block=block))
        # head-major grids (a slot's KV heads in neighbouring programs), one tile and looped, with the fold
        for block in (None, 32):
            print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 1, 63, 64, 65, 200, 300),
                                          chunk=128, num_warps=4, block=block, head_major=True, fold=True))
        print(check_against_reference(cpu, torch.float32, 4, 4, 16, lengths=(3, 0, 130), head_major=True))
        # a program per pair of KV heads (block-diagonal queries over whole cache rows): tile and chunk edges,
        # the fold, more chunks than one merge pass, and two pairs without GQA
        print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 1, 31, 32, 33, 63, 64, 65, 127, 128,
                                      129, 200, 300), chunk=128, num_warps=4, block=32, pairs=True))
        print(check_against_reference(cpu, torch.float32, 14, 2, 64, lengths=(0, 1, 64, 65, 200, 257), chunk=64,
                                      num_warps=4, block=32, pairs=True, fold=True))
        print(check_against_reference(cpu, torch.float32, 12, 2, 128, lengths=(600, 5), chunk=64, num_warps=4,
                                      block=32, pairs=True))
        print(check_against_reference(cpu, torch.float32, 4, 4, 16, lengths=(3, 0, 130), chunk=64, num_warps=4,
                                      block=16, pairs=True))
    """))
    errs = [float(x) for x in out.split()]
    assert len(errs) == 16 and max(errs) < 1e-4, errs


def test_engine_with_fused_attention_and_compaction_under_interpreter(triton_interpreter):
    """The whole engine on the fused path (the norms folded into the attention and SiLU-mul kernels):
    logprobs equal a plain forward, results do not depend on the batch, and a long tail makes the
    engine move slots down into a smaller bucket."""
    out = triton_interpreter("-c", textwrap.dedent("""
        import numpy as np, torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from areal_hpc.api import GenRequest
        from areal_hpc.rollout.fast import FastEngine

        class _Tok:
            eos_id, pad_id, stop_ids = 2, 0, frozenset({2})
        cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        m = Qwen2ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.3)

        def _reference_logprobs(model, g):
            s = torch.tensor(g.request.prompt_tokens + g.tokens)
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=s[None]).logits[0].float(), -1)
            P = len(g.request.prompt_tokens)
            return [lp[P - 1 + j, t].item() for j, t in enumerate(g.tokens)]

        g = torch.Generator().manual_seed(0)
        # 34 requests: most short, a few long, so the live slots thin out while slots are high
        reqs = [GenRequest(i, i, i // 4, torch.randint(3, 97, (3 + i % 5,), generator=g).tolist(),
                           max_tokens=(16 if i % 11 == 10 else 1 + i % 3)) for i in range(34)]
        def run(batch):
            eng = FastEngine(m, _Tok(), max_batch=batch, max_new_tokens=16, max_seq_len=32, temperature=1.0,
                             top_p=1.0, seed=5, cuda_graphs=False)
            assert eng.decode.fused_attn and eng.decode.fold_kernel
            return eng, eng.generate(reqs)
        big, a = run(32)
        _, b = run(1)
        assert big.compactions >= 1 and big.slots_moved >= 1, (big.compactions, big.slots_moved)
        assert min(big.bucket_steps) == 16 and max(big.bucket_steps) == 32, big.bucket_steps
        worst = 0.0
        for x, y in zip(a, b, strict=True):
            assert x.tokens == y.tokens
            worst = max(worst, float(np.abs(np.array(x.logprobs) - np.array(y.logprobs)).max()))
            worst = max(worst, float(np.abs(np.array(x.logprobs) - np.array(_reference_logprobs(m, x))).max()))
        print(worst, big.compactions, big.slots_moved)
    """))
    worst, compactions, moved = out.split()
    assert float(worst) < 1e-4 and int(compactions) >= 1


@cuda
@pytest.mark.parametrize(("heads", "kv", "dim", "lengths"), [
    (14, 2, 64, (0, 1, 63, 64, 65, 383, 200, 17)),
    (12, 2, 128, (1151, 0, 640, 64, 999)),
    (4, 4, 64, (99, 3, 0)),
])
@pytest.mark.parametrize("split", ["64x4", "32x2", "128x4", "128x8", "256x8", "256x4x64", "512x4x64", "1024x4x64",
                                   "512x8x128", "128x4h", "256x4x64h", "512x4x64h", "1024x4x64h", "256x4x32p",
                                   "512x4x32p", "512x8x64p", "1024x4x32p"])
def test_gpu_fused_decode_attention_matches_reference(heads, kv, dim, lengths, split):
    """bf16, every split the engine may choose: within 2e-2 of RoPE + index write + SDPA; the new
    key/value land in the cache."""
    from areal_hpc.rollout.fast.decode_kernel import check_against_reference, parse_config, split_args

    for fold in (False, True):
        assert check_against_reference(torch.device("cuda"), torch.bfloat16, heads, kv, dim, lengths,
                                       **split_args(parse_config(split)), fold=fold) < 2e-2


@cuda
@pytest.mark.parametrize("split", ["64x4", "256x4x64", "1024x4x64", "128x4h", "512x4x64h", "256x4x32p", "1024x4x32p"])
def test_gpu_cross_program_merge_is_exact_every_time(split):
    """The last chunk to finish merges the others' partials (an atomic count, no second kernel): a race
    would show as an occasional wrong row. 256 slots at random contexts (64-2000 keys), 50 launches
    alternating between two inputs, each checked against the reference (a partial read before its
    store would hold the other input's value); the counts are back to zero at the end."""
    from areal_hpc.rollout.fast.decode_kernel import check_against_reference, parse_config, split_args

    lengths = tuple(torch.randint(64, 2000, (256,), generator=torch.Generator().manual_seed(7)).tolist())
    assert check_against_reference(torch.device("cuda"), torch.bfloat16, 14, 2, 64, lengths,
                                   **split_args(parse_config(split)), reps=50) < 2e-2


def test_every_split_name_parses_back_to_its_config():
    """``FastEngine(decode_attention=NAME)`` (the decode bench's ``--decode-attention``) takes exactly the
    splits the tuner (``tuner.py``) tries, by the names ``config_name`` gives them."""
    from areal_hpc.rollout.fast.decode_kernel import CONFIGS, config_name, parse_config

    assert all(parse_config(config_name(c)) == c for c in CONFIGS)
    assert len({config_name(c) for c in CONFIGS}) == len(CONFIGS)


@cuda
def test_gpu_engine_tunes_the_split_and_any_split_generates_the_same():
    """At start the engine times every split on its own batch and keeps the fastest; a fixed split
    generates what the tuned one does (up to bf16 summation order)."""
    import numpy as np
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from areal_hpc.api import GenRequest
    from areal_hpc.rollout.fast import FastEngine
    from areal_hpc.rollout.fast.decode_kernel import CONFIGS, config_name

    cfg = Qwen2Config(vocab_size=997, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()

    class Tok:
        eos_id, pad_id, stop_ids = -1, 0, frozenset()

    def engine(split):
        return FastEngine(m, Tok(), max_batch=32, max_new_tokens=40, max_seq_len=300, temperature=1.0, top_p=1.0,
                          seed=3, decode_attention=split)

    auto = engine("auto")
    st = auto.stats()
    assert st["decode_attention"] in {config_name(c) for c in CONFIGS}
    assert len(st["decode_attention_us"]) >= 2 and min(st["decode_attention_us"].values()) > 0
    g = torch.Generator().manual_seed(1)
    reqs = [GenRequest(i, i, i, torch.randint(3, 997, (200 + i,), generator=g).tolist(), max_tokens=40)
            for i in range(32)]
    other = "512x4x64" if st["decode_attention"] != "512x4x64" else "64x4"
    a, b = auto.generate(reqs, greedy=True), engine(other).generate(reqs, greedy=True)
    same = [x for x, y in zip(a, b, strict=True) if x.tokens == y.tokens]
    assert len(same) >= 0.8 * len(reqs)
    for x, y in zip(a, b, strict=True):
        k = next((j for j, (p, q) in enumerate(zip(x.tokens, y.tokens)) if p != q), len(x.tokens))
        assert np.allclose(x.logprobs[:k], y.logprobs[:k], atol=3e-2)


def test_split_names_round_trip_and_say_the_grid_order():
    from areal_hpc.rollout.fast.decode_kernel import CONFIGS, config_name, parse_config, split_args

    assert all(parse_config(config_name(c)) == c for c in CONFIGS)
    assert config_name((512, 4, 64)) == "512x4x64" and config_name((64, 4)) == "64x4"
    assert split_args(parse_config("512x4x64h")) == {"chunk": 512, "num_warps": 4, "block": 64, "head_major": True,
                                                     "pairs": False}
    assert split_args(parse_config("128x4h")) == {"chunk": 128, "num_warps": 4, "block": None, "head_major": True,
                                                  "pairs": False}
    assert split_args(parse_config("512x4x32p"))["pairs"]
    with pytest.raises(ValueError, match="not one of"):
        parse_config("512x4x32h")
