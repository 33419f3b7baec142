"""Engine set-up (DeepSpeed config, optimizer, lr schedule, fp16 refusal) and the single-process loss."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from helpers_dist import run_train
from trainer import checkpoint
from scan.config import ExperimentConfig
from scan.configfile import ConfigError
from trainer.distributed import DistEnv
from trainer.engine import build_optimizer, deepspeed_config, lr_factor
from scan.loss import hardest_negative_loss
from trainer.telemetry import read_run_log
from scan.loss import batch_loss
from scan.xattn import xattn_scores

CPU = torch.device("cpu")
NO_GPU = not torch.cuda.is_available()


def test_fp16_refused_on_cpu():
    cfg = ExperimentConfig()
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match=r"'train.precision': 'fp16' is not supported on CPU"):
        deepspeed_config(cfg, 1, CPU)


@pytest.mark.skipif(not NO_GPU, reason="fp16 is allowed where a GPU is")
@pytest.mark.integration
def test_fp16_run_on_cpu_stops_with_a_clear_message(generated_shards, tmp_path):
    done = run_train(generated_shards, tmp_path, "train.precision=fp16", "train.max_steps=1")
    assert done.returncode == 2
    assert "'fp16' is not supported on CPU" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="fp16 (dynamic loss scaling) needs a CUDA GPU")
@pytest.mark.integration
def test_fp16_trains_on_gpu(generated_shards, tmp_path):
    done = run_train(generated_shards, tmp_path, "train.precision=fp16", "train.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_run_log(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 3 and all(r["loss_scale"] for r in steps)


@pytest.mark.integration
def test_non_finite_loss_stops_the_run(generated_shards, tmp_path):
    done = run_train(generated_shards, tmp_path, "loss.margin=.inf", "train.max_steps=2")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "non-finite training loss inf at epoch 0, step 1" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_deepspeed_config_merges_json_under_experiment_fields(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1, "zero_optimization": {"reduce_bucket_size": 1234},
                                "optimizer": {"type": "Lamb"}}))
    cfg = ExperimentConfig()
    cfg.train.deepspeed_config = str(path)
    cfg.train.precision, cfg.train.zero_stage, cfg.train.grad_accum = "fp32", 2, 3
    cfg.data.batch_size = 16
    ds = deepspeed_config(cfg, 4, CPU)
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1234}
    assert ds["gradient_clipping"] == 2.0 and "optimizer" not in ds
    assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]


def test_bf16_keeps_fp32_master_weights():
    cfg = ExperimentConfig()
    cfg.train.precision, cfg.train.zero_stage = "bf16", 0
    ds = deepspeed_config(cfg, 1, CPU)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_missing_deepspeed_json_names_the_key():
    cfg = ExperimentConfig()
    cfg.train.deepspeed_config = "/nonexistent/ds.json"
    with pytest.raises(ConfigError, match="train.deepspeed_config.*does not exist"):
        deepspeed_config(cfg, 1, CPU)


def test_shipped_deepspeed_json_is_valid():
    cfg = ExperimentConfig()
    cfg.train.deepspeed_config = str(Path(__file__).parents[1] / "configs/deepspeed/default.json")
    assert deepspeed_config(cfg, 2, CPU)["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_cpu_optimizer_choice(name, cls, caplog):
    cfg = ExperimentConfig()
    cfg.optim.name, cfg.optim.use_apex = name, True  # no GPU here: apex cannot be used
    with caplog.at_level(logging.WARNING):
        opt, label = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], CPU)
    assert type(opt) is cls and label == f"torch.optim.{cls.__name__}"
    assert "use_apex" in caplog.text


def test_lr_schedule_step_decay_and_warmup():
    f = lambda step, epoch, warm=0: lr_factor(step, epoch, lr_update=[15, 20],  # noqa: E731
                                              lr_decay=0.1, warmup_steps=warm)
    assert f(0, 0) == 1.0 and f(149, 14) == 1.0
    assert f(150, 15) == pytest.approx(0.1) and f(199, 19) == pytest.approx(0.1)
    assert f(200, 20) == pytest.approx(0.01)
    assert f(0, 0, warm=4) == pytest.approx(0.25) and f(3, 0, warm=4) == 1.0 and f(4, 0, warm=4) == 1.0


def test_scheduler_decays_at_the_loops_epoch_and_keeps_it_in_its_state():
    from trainer.engine import EpochStepLR

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = EpochStepLR(opt, lr_update=[1], lr_decay=0.1, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1.0  # steps alone never decay
    sched.set_epoch(1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # at once, for the next step
    state = sched.state_dict()
    again = EpochStepLR(opt, lr_update=[1], lr_decay=0.1, warmup_steps=0)
    again.load_state_dict(state)
    assert again.epoch == 1 and again.last_epoch == 5


@pytest.mark.integration
def test_no_early_decay_when_batches_do_not_divide_by_accumulation(generated_shards, tmp_path):
    """Issue 10: 10 batches per epoch with accumulation 4 gave 2 'steps per epoch', so the third
    step (micro-batches 8-11, still mostly epoch 0) already ran at the decayed lr."""
    done = run_train(generated_shards, tmp_path, "data.batch_size=60", "train.grad_accum=4",
                     "optim.lr_update=[1]", "train.epochs=3")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_run_log(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == 7  # 30 micro-batches over 3 epochs, 4 per step: 7 steps, 2 left at the end
    base = 2e-3  # configs/train_tiny.yaml
    for r in steps:
        assert r["lr"] == pytest.approx(base if r["epoch"] == 0 else base * 0.1), r
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1, 1, 2, 2]
    assert "did not reach an optimizer step" in done.stderr
    assert checkpoint.latest_tag(tmp_path / "checkpoints") is not None


def _embeddings(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(6, 5, 8, generator=g)
    img_lens = torch.tensor([5, 3, 4, 5, 2, 3])
    cap_lens = torch.tensor([7, 2, 5, 6, 4, 3])
    img[3], img_lens[3] = img[0], img_lens[0]  # pairs 0 and 3 show the same image
    # Words are noisy copies of their own image's regions: positives score clearly highest.
    cap = img[:, torch.arange(7) % 2] + 0.1 * torch.randn(6, 7, 8, generator=g)
    ids = torch.tensor([10, 11, 12, 10, 13, 14])
    return img, img_lens, cap, cap_lens, ids


def test_same_image_pairs_masked_in_the_training_loss():
    img, img_lens, cap, cap_lens, ids = _embeddings()
    cfg = ExperimentConfig()
    scores = xattn_scores(img, cap, cap_lens, cfg.xattn, img_lens)
    # Caption 3 describes image 0 exactly as well as image 3: unmasked, a negative violating by margin.
    assert scores[0, 3] == pytest.approx(float(scores[3, 3]))
    _, masked = batch_loss(img, img_lens, cap, cap_lens, ids, cfg.loss, cfg.xattn)
    assert float(masked) == pytest.approx(float(hardest_negative_loss(scores, 0.2, True, ids)), rel=1e-6)
    cfg.loss.mask_same_image = False  # the reference's behaviour
    _, unmasked = batch_loss(img, img_lens, cap, cap_lens, ids, cfg.loss, cfg.xattn)
    assert float(unmasked) == pytest.approx(float(hardest_negative_loss(scores, 0.2, True)), rel=1e-6)
    assert float(unmasked) >= float(masked) + 0.2  # the duplicate was the hardest negative


def test_caption_chunks_give_the_same_loss_and_gradients():
    img, img_lens, cap, cap_lens, ids = _embeddings(1)
    cfg = ExperimentConfig()
    results = []
    for chunk in (0, 4):
        cfg.loss.caption_chunk = chunk
        i, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
        loss, _ = batch_loss(i, img_lens, c, cap_lens, ids, cfg.loss, cfg.xattn)
        loss.backward()
        results.append((float(loss.detach()), i.grad, c.grad))
    (l0, gi0, gc0), (l1, gi1, gc1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    torch.testing.assert_close(gi0, gi1)
    torch.testing.assert_close(gc0, gc1)


def test_resume_latest_without_checkpoint_is_a_clear_error(tmp_path):
    env = DistEnv(rank=0, world=1, local_rank=0, device=CPU)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.load(None, tmp_path / "checkpoints", "latest", env)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(None, tmp_path / "checkpoints", "step00000007", env)


@pytest.mark.parametrize("name, stage, precision", [("zero1_bf16", 1, "bf16"), ("zero2_fp16", 2, "fp16")])
def test_shipped_deepspeed_json_must_agree_with_the_experiment(name, stage, precision):
    from scan.config import load_experiment
    from trainer.engine import deepspeed_config

    path = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{name}.json"
    cuda = torch.device("cuda")  # only read to decide whether fp16 is allowed: nothing runs on it
    good = load_experiment(None, [f"train.deepspeed_config={path}", f"train.zero_stage={stage}",
                                  f"train.precision={precision}"])
    ds = deepspeed_config(good, 2, cuda)
    assert ds["zero_optimization"]["stage"] == stage and ds[precision]["enabled"]
    with pytest.raises(ConfigError, match=rf"{name}.json.*train.zero_stage"):
        deepspeed_config(load_experiment(None, [f"train.deepspeed_config={path}", "train.zero_stage=0",
                                                f"train.precision={precision}"]), 2, cuda)
    with pytest.raises(ConfigError, match=rf"{name}.json.*train.precision"):
        deepspeed_config(load_experiment(None, [f"train.deepspeed_config={path}", f"train.zero_stage={stage}",
                                                "train.precision=fp32"]), 2, cuda)


def test_a_resumed_position_keeps_the_epochs_segments_for_any_world():
    from scan.configfile import ConfigError
    from trainer.position import Position, resumed_position

    data = {"data.train_shards": "abc", "data.caps_per_image": 5, "data.resampled": False, "train.seed": 0}
    saved = {"scan_position": vars(Position(epoch=2, samples=96, step=40, world=2, segments=[[4, 32]])),
             "scan_data": data}
    env = lambda w: DistEnv(rank=0, world=w, local_rank=0, device=CPU)  # noqa: E731
    pos = resumed_position(saved, data, env(3))  # 2 ranks -> 3: the epoch is re-planned
    assert (pos.epoch, pos.step, pos.samples, pos.world) == (2, 40, 0, 3)
    assert pos.epoch_segments() == [(4, 32), (2, 96)]
    with pytest.raises(ConfigError, match=r"inside epoch 2.*train.seed was 0, now 1"):
        resumed_position(saved, {**data, "train.seed": 1}, env(2))
    at_epoch_start = {"scan_position": vars(Position(epoch=3, step=41, world=2)), "scan_data": data}
    assert resumed_position(at_epoch_start, {**data, "train.seed": 1}, env(8)).epoch_segments() == []
