"""The training-step benchmark compares like with like (benchmarks/train_step*.py).

A speed ratio means something only if both sides do the same work: the derta_jax step and
the PyTorch step must compute the same loss from the same weights and apply the same
update, the SFT batch must be the DeRTa batch's twin, and padded and packed batches must
hold the same rows. No timing is asserted anywhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks import train_step_setup as setup

TINY = setup.BenchShape(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                        batch=4, seq=24)


def test_jax_step_and_pytorch_step_compute_the_same_losses_and_updates():
    import jax

    from derta_jax import loss as derta

    hf_model, model, _ = setup.build_models(TINY)
    optim = setup.optimizer_config(lr=1e-2)  # large steps: a wrong update shows in step 2
    derta_batch, _ = setup.derta_and_sft_batches(TINY, refusal_id=5, prompt_len=6)
    step, fresh_state, frozen = setup.make_jax_step(model, derta.LossConfig(rto_keep_rate=1.0),
                                                    optim)
    torch_step = setup.make_torch_step(hf_model, optim)
    state = fresh_state()
    jax_batch, torch_batch = setup.to_device(derta_batch), setup.to_torch(derta_batch)
    jax_losses, torch_losses = [], []
    for _ in range(3):
        state, metrics = step(state, frozen, jax_batch)
        jax_losses.append(float(jax.device_get(metrics["loss"])))
        torch_losses.append(float(torch_step(torch_batch)))
    assert jax_losses[0] != jax_losses[2]  # the parameters did move
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=2e-5)


def test_sft_batch_is_the_derta_batch_without_rto():
    derta_batch, sft = setup.derta_and_sft_batches(TINY, refusal_id=5, prompt_len=6, seed=3)
    b, t = TINY.batch, TINY.seq
    for batch in (derta_batch, sft):
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "input_ids": ((b, t), "int32"), "targets": ((b, t), "int32"),
            "loss_mask": ((b, t), "bool"), "rto_mask": ((b, t), "bool"),
            "positions": ((b, t), "int32"), "segment_ids": ((b, t), "int32")}
    np.testing.assert_array_equal(derta_batch["input_ids"], sft["input_ids"])
    np.testing.assert_array_equal(derta_batch["loss_mask"], sft["loss_mask"])
    assert not sft["rto_mask"].any()
    for row in range(b):  # slow reference, position by position
        for pos in range(t):
            supervised = 5 <= pos <= t - 2  # from the last prompt token to the second-to-last
            assert sft["loss_mask"][row, pos] == supervised
            harmful = row % 2 == 1
            assert derta_batch["rto_mask"][row, pos] == (supervised and harmful)
            next_token = sft["input_ids"][row, pos + 1] if supervised else 0
            assert sft["targets"][row, pos] == next_token
            expected = 5 if supervised and harmful else next_token
            assert derta_batch["targets"][row, pos] == expected


def test_prompt_length_outside_the_row_is_refused():
    with pytest.raises(ValueError, match=r"prompt_len=24: must be in 1..seq-1=23"):
        setup.derta_and_sft_batches(TINY, refusal_id=5, prompt_len=24)


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        mask = np.zeros(n, bool)
        mask[: n - 1] = True
        rows.append({"input_ids": rng.integers(3, 90, n).astype(np.int32),
                     "targets": rng.integers(3, 90, n).astype(np.int32),
                     "loss_mask": mask, "rto_mask": np.zeros(n, bool)})
    return rows


def test_padded_and_packed_batches_hold_the_same_rows():
    lengths = [3, 24, 7, 11, 5, 20, 2, 9, 13, 4, 17]
    rows = _rows(lengths)
    padded, packed = setup.padded_and_packed_batches(rows, TINY, pad_id=1)
    assert len(padded) == -(-len(rows) // TINY.batch)
    assert len(packed) < len(padded) + 1

    def segments(batches):
        found = []
        for batch in batches:
            assert batch["input_ids"].shape == (TINY.batch, TINY.seq)
            for r in range(TINY.batch):
                seg = batch["segment_ids"][r]
                assert (batch["input_ids"][r][seg == 0] == 1).all()  # padding is the pad id
                for s in range(1, seg.max() + 1):
                    where = seg == s
                    np.testing.assert_array_equal(batch["positions"][r][where],
                                                  np.arange(where.sum()))
                    found.append(tuple(batch["input_ids"][r][where]))
        return sorted(found)

    expected = sorted(tuple(row["input_ids"]) for row in rows)
    assert segments(padded) == expected
    assert segments(packed) == expected
    assert sum(setup.useful_tokens(b) for b in padded) == sum(lengths)
    assert sum(setup.useful_tokens(b) for b in packed) == sum(lengths)


def test_pytorch_side_refuses_packed_batches():
    _, packed = setup.padded_and_packed_batches(_rows([5, 6, 7]), TINY, pad_id=0)
    with pytest.raises(ValueError, match=r"batch\['segment_ids'\] holds packed rows"):
        setup.to_torch(packed[0])


def test_command_line_prints_every_figure(capsys, monkeypatch):
    from benchmarks import train_step

    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine

    argv = ["--vocab", "512", "--hidden", "32", "--layers", "1", "--heads", "4",
            "--kv_heads", "2", "--intermediate", "48", "--batch", "4", "--seq", "64",
            "--repeats", "1", "--matmul", "64", "--matmul_count", "1", "--mixture_rows", "24"]
    results = train_step.main(argv)
    out = capsys.readouterr().out
    assert f"command: `python -m benchmarks.train_step {' '.join(argv)}`" in out
    assert "load average (1/5/15 min): before " in out
    assert "1 interleaved repetitions in " in out
    for label in ("| derta_jax (DeRTa loss, keep 0.05, AdamW, jit) |",
                  "| HF MistralForCausalLM + torch AdamW (eager, CE) |",
                  "| plain SFT (no RTO, keep 1.0) |", "| DeRTa (half rows RTO, keep 0.05) |",
                  "| synthetic world (24 rows,", "| paper-shaped lengths (24 rows,"):
        assert label in out
    for name, row in results["mixtures"].items():
        # useful tokens are the same rows in both modes, over fewer packed steps
        tokens = 4 * 64
        useful = [round(row[m]["non_pad"] * row[m]["steps"] * tokens)
                  for m in ("padding", "packing")]
        assert useful[0] == useful[1] == round(row["mean_length"] * row["rows"]), name
        assert row["packing"]["steps"] <= row["padding"]["steps"]
    assert "LOADED" not in out and "withheld" not in out
    assert f"| **{results['speedup']:.2f}x** (" in out
    # the same figures measured at a load above the core count: no headline ratio at all
    cores = results["info"]["cores"]
    busy = dict(results, info={**results["info"], "load1_after": cores + 0.5})
    text = train_step.report(busy, "python -m benchmarks.train_step")
    assert "LOADED: the 1-minute load average" in text and "withheld (loaded)" in text
    assert "**" not in text and "| withheld (loaded) (-) | - |" in text  # MFU too




def test_interleaved_samples_warm_up_once_then_shuffle_each_repetition():
    from benchmarks.timing import interleaved_samples

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    wall, cpu = interleaved_samples(fns, repeats=6, seed=0)
    assert calls[:4] == list("abcd")  # one warm-up call each, not timed
    for samples in (wall, cpu):
        assert {name: len(t) for name, t in samples.items()} == {n: 6 for n in "abcd"}
    rotations = [tuple(calls[4 + 4 * r: 8 + 4 * r]) for r in range(6)]
    assert all(sorted(r) == list("abcd") for r in rotations)  # every fn once per repetition
    assert len(set(rotations)) > 1  # and not always in the same order


def test_derta_loss_adds_no_matmul_work_over_sft_in_the_compiled_step():
    from derta_jax import loss as derta

    _, model, _ = setup.build_models(TINY)
    optim = setup.optimizer_config()
    derta_batch, sft = setup.derta_and_sft_batches(TINY, refusal_id=5, prompt_len=6)
    def cost(keep_rate, batch):
        step = setup.make_jax_step(model, derta.LossConfig(rto_keep_rate=keep_rate), optim)
        return setup.xla_cost(setup.compile_step(step, batch)[0])

    keep, plain = cost(0.05, derta_batch), cost(1.0, sft)
    assert keep["flops"] > 0 and plain["flops"] > 0
    assert keep["flops"] / plain["flops"] < 1.01
