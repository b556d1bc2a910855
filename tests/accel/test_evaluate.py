import math

import pytest
import torch

from adaptdiff.accel.evaluate import Applied, Method, Result, evaluate, format_table, pareto, plot
from adaptdiff.accel.tokens.ras import RAS

from .test_ras import random_dit


def result(method, speedup, psnr, model="m"):
    return Result(model, method, "", 1.0, speedup, 8, 1.0, psnr, 1.0)


def test_pareto_keeps_rows_no_other_row_beats_in_speed_and_psnr():
    rows = [result("a", 1.0, 40), result("b", 2.0, 30), result("c", 1.5, 25), result("d", 3.0, 20),
            result("e", 1.5, 25, model="other")]  # fmt: skip
    front = pareto(rows)
    assert [r.method for r in front] == ["a", "b", "d", "e"]
    assert not rows[2].pareto


def test_evaluate_compares_each_method_with_the_exact_run(tmp_path):
    torch.set_num_threads(1)
    model = random_dit()
    y = torch.arange(4) % 10

    def ras(m):
        r = RAS(m, sample_ratio=0.5, start_step=2)
        return Applied([r], lambda: {"compute": r.summary()["active_fraction"]}, r.remove)

    methods = [Method("RAS", "0.5", ras), Method("fewer steps", "euler 4", sampler={"steps": 4})]
    sampler = dict(method="euler", steps=8, prediction="flow", guidance_scale=2.0,
                   cond={"y": y}, uncond={"y": torch.full_like(y, 10)})  # fmt: skip
    rows = evaluate(model, methods, model_name="tiny", shape=(4, 4, 8, 8), sampler=sampler,
                    clock="cpu", score=lambda x: {"fd": float(x.std())})  # fmt: skip
    exact, ras_row, fewer = rows
    assert exact.method == "exact" and exact.speedup == 1.0 and exact.psnr == 99.0
    assert ras_row.compute == pytest.approx((2 + 6 * 0.5) / 8)
    assert fewer.nfe == 4 and fewer.compute == 1.0
    for r in (ras_row, fewer):
        assert math.isfinite(r.psnr) and r.psnr < 99 and 0 < r.ssim < 1 and r.speedup > 0
        assert r.fd is not None
    assert "forward" not in model.blocks[0].attn.__dict__  # removed after its run
    table = format_table(rows)
    assert table.count("\n") == 4 and "digits-FD" in table
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(ValueError, match="clock"):
        evaluate(model, [], model_name="tiny", shape=(4, 4, 8, 8), sampler=sampler, clock="gpu")


def test_decode_turns_every_runs_samples_into_images_before_they_are_compared_or_scored():
    torch.set_num_threads(1)
    model = random_dit()
    y = torch.arange(2)
    seen = []

    def decode(z):  # a stand-in autoencoder: 4 latent channels -> one image channel
        seen.append(tuple(z.shape))
        return z.mean(1, keepdim=True)

    sampler = dict(method="euler", steps=4, prediction="flow", cond={"y": y})
    rows = evaluate(model, [Method("fewer steps", "euler 2", sampler={"steps": 2})],
                    model_name="tiny", shape=(2, 4, 8, 8), sampler=sampler,
                    score=lambda x: {"fd": float(x.shape[1])}, decode=decode)  # fmt: skip
    assert seen and all(s == (2, 4, 8, 8) for s in seen)  # the warm-up, exact and method runs
    assert [r.fd for r in rows] == [1.0, 1.0]  # scored on the decoded one-channel images
    assert rows[1].psnr < 99.0
