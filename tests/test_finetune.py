"""Fine-tuning, linear probing and evaluation end to end, distributed evaluation, and bad input."""
import json
import os
import re

import numpy as np
import pytest

import main_finetune
import main_linprobe
from conftest import ROOT, golden
from data import make_train_val
from helpers import run_script, state_of
from util.weights import load_checkpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("cls")), 3, 8, 3)


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrain"))
    res = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", dataset, "--batch_size", "8",
                     "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--output_dir", out,
                     "--log_dir", "", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    return os.path.join(out, "checkpoint-0.pd")


def _common(data, out, *extra):
    return ["--data_path", data, "--nb_classes", "3", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--output_dir", out, "--log_dir", out, "--device", "cpu", "--print_freq", "2",
            *extra]


def _accuracy(stdout):
    found = re.findall(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)", stdout)
    assert found, stdout[-2000:]
    return [float(v) for v in found[-1]]


@pytest.mark.slow
def test_finetune_eval_linprobe_eval(dataset, pretrained, tmp_path):
    ft = str(tmp_path / "ft")
    out = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--finetune", pretrained, "--mixup", "0.8",
                     "--cutmix", "1.0", "--reprob", "0.25", "--aa", "rand-m9-mstd0.5-inc1", "--input_size", "48",
                     *_common(dataset, ft))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Position interpolate from 8x8 to 12x12" in out.stdout and "Mixup is activated!" in out.stdout
    assert "criterion = SoftTargetCrossEntropy()" in out.stdout
    assert sorted(f for f in os.listdir(ft) if f.endswith(".pd")) == \
        ["checkpoint-0.pd", "checkpoint-1.pd", "checkpoint-best.pd", "checkpoint-last.pd"]
    logs = [json.loads(line) for line in open(os.path.join(ft, "log.txt"))]
    assert [list(r) for r in logs] == [["train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch",
                                        "n_parameters"]] * 2
    best = max(r["test_acc1"] for r in logs)
    from visualdl import LogReader
    reader = LogReader(file_path=os.path.join(ft, [f for f in os.listdir(ft) if f.startswith("vdlrecords")][0]))
    assert {"loss", "lr", "perf/test_acc1", "perf/test_acc5", "perf/test_loss"} <= set(reader.get_tags()["scalar"])

    out = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--input_size", "48", "--eval", "--resume",
                     os.path.join(ft, "checkpoint-best.pd"), *_common(dataset, ""), "--batch_size", "64")
    assert out.returncode == 0, out.stderr[-3000:]
    acc1, acc5, _ = _accuracy(out.stdout)
    assert acc1 == pytest.approx(best, abs=1e-3) and acc5 == 100.0  # 3 classes: top-5 is every class
    assert "Accuracy of the network on the 9 test images" in out.stdout  # a batch larger than train/ is no error

    lp = str(tmp_path / "lp")
    out = run_script("main_linprobe.py", "--model", "vit_tiny_patch4", "--finetune", pretrained, "--eval_freq", "2",
                     *_common(dataset, lp))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LARS(lr=0.0015625" in out.stdout  # blr 0.1 * 4 / 256
    state = state_of(os.path.join(lp, "checkpoint-1.pd"))
    start = state_of(pretrained)
    assert np.array_equal(state["blocks.3.mlp.fc1.weight"], start["blocks.3.mlp.fc1.weight"])  # encoder frozen
    assert {"head.0._mean", "head.0._variance", "head.1.weight", "head.1.bias"} <= set(state)
    assert not np.allclose(state["head.0._mean"], 0)  # BN statistics were tracked in train mode
    logs = [json.loads(line) for line in open(os.path.join(lp, "log.txt"))]
    assert ["test_acc1" in r for r in logs] == [False, True]  # --eval_freq 2: after the second epoch only
    assert out.stdout.count("Accuracy of the network") == 1
    out = run_script("main_linprobe.py", "--model", "vit_tiny_patch4", "--eval", "--resume",
                     os.path.join(lp, "checkpoint-1.pd"), *_common(dataset, ""))
    assert out.returncode == 0, out.stderr[-3000:]
    assert _accuracy(out.stdout)[0] == pytest.approx(logs[-1]["test_acc1"], abs=1e-3)


def test_partial_finetuning_trains_the_last_blocks_only(dataset, pretrained, tmp_path):
    """--partial_blocks 1: the last block, fc_norm and the head change; the patch embedding, the tokens and the
    earlier blocks stay as pre-trained, also with --recompute (whose frozen blocks have no input to
    differentiate) and after a resume; more blocks than the model has is a flag error."""
    start = state_of(pretrained)
    for flags in ([], ["--recompute"]):
        out = str(tmp_path / f"partial{len(flags)}")
        res = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--finetune", pretrained,
                         "--partial_blocks", "1", *flags, *_common(dataset, out))
        assert res.returncode == 0, res.stderr[-3000:]
        first, last = state_of(os.path.join(out, "checkpoint-0.pd")), state_of(os.path.join(out, "checkpoint-1.pd"))
        depth = 1 + max(int(k.split(".")[1]) for k in last if k.startswith("blocks."))
        for key, value in last.items():
            tuned = key.startswith((f"blocks.{depth - 1}.", "fc_norm.", "head."))
            assert np.array_equal(value, first[key]) != tuned, key  # the tuned ones move every epoch
            if not tuned:
                assert np.array_equal(value, start[key]), key
    res = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--finetune", pretrained, "--partial_blocks",
                     "1", *_common(dataset, out), "--epochs", "3")  # continues checkpoint-last: a third epoch
    assert res.returncode == 0 and "Resume checkpoint" in res.stdout, res.stderr[-3000:]
    third = state_of(os.path.join(out, "checkpoint-2.pd"))
    frozen = [k for k in third if k in start and not k.startswith((f"blocks.{depth - 1}.", "fc_norm.", "head."))]
    assert frozen and all(np.array_equal(third[k], start[k]) for k in frozen)
    assert not np.array_equal(third["head.weight"], last["head.weight"])
    res = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--partial_blocks", "13",
                     *_common(dataset, str(tmp_path / "bad")))
    assert res.returncode == 2 and res.stderr == "error: --partial_blocks 13: vit_tiny_patch4 has 12 blocks\n"


@pytest.mark.slow
def test_official_pth_as_finetune_and_global_pool_linprobe(dataset, tmp_path):
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--finetune", golden("mae_tiny.pth"),
                     "--smoothing", "0.1", *_common(dataset, str(tmp_path / "ft"), "--epochs", "1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "criterion = LabelSmoothingCrossEntropy(smoothing=0.1)" in out.stdout
    lp = str(tmp_path / "lp")
    out = run_script("main_linprobe.py", "--model", "vit_micro_patch4", "--global_pool", "--finetune",
                     golden("mae_tiny.pth"), *_common(dataset, lp, "--epochs", "1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fc_norm starts from the encoder's final norm" in out.stdout
    official = load_checkpoint(golden("mae_tiny.pth"))["model"]
    state = state_of(os.path.join(lp, "checkpoint-0.pd"))
    assert np.array_equal(state["fc_norm.weight"], official["norm.weight"])


@pytest.mark.slow
def test_finetune_from_a_classifier_of_other_classes(dataset, tmp_path):
    """A fine-tuned 3-class checkpoint starts a 5-class fine-tune: its head is dropped."""
    first = str(tmp_path / "first")
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4", *_common(dataset, first, "--epochs", "1"))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--finetune",
                     os.path.join(first, "checkpoint-0.pd"),
                     *_common(dataset, str(tmp_path / "second"), "--epochs", "1", "--nb_classes", "5"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Removing key head.weight from pretrained checkpoint" in out.stdout


@pytest.mark.slow
def test_finetune_distributed_dist_eval(dataset, pretrained, tmp_path):
    log_dir, out_dir = str(tmp_path / "launch"), str(tmp_path / "out")
    out = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
                     "main_finetune.py", "--model", "vit_tiny_patch4", "--finetune", pretrained, "--dist_eval",
                     *_common(dataset, out_dir, "--epochs", "1", "--batch_size", "2"))
    worker0 = open(os.path.join(log_dir, "workerlog.0")).read()
    assert out.returncode == 0, out.stderr[-2000:] + worker0[-3000:]
    assert "not divisible by process number" in worker0  # 9 val images over 2 processes
    assert "distributed init (rank 1 of 2" in open(os.path.join(log_dir, "workerlog.1")).read()
    assert "effective batch size: 4" in worker0
    assert len(open(os.path.join(out_dir, "log.txt")).readlines()) == 1


SEED_FINETUNE = ("--batch_size 32 --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --epochs 100 "
                 "--blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 "
                 "--reprob 0.25 --dist_eval --data_path /data/imagenet")
SEED_LINPROBE = ("--batch_size 512 --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth "
                 "--epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval --data_path /data/imagenet")
SEED_EVAL = "--eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --batch_size 16 --data_path /data/in"


def test_seed_readme_commands_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoints the commands name, as a user would have downloaded them
    for name in ("mae_pretrain_vit_base.pth", "mae_finetuned_vit_base.pth"):
        (tmp_path / name).write_bytes(b"")
    ft = main_finetune.parse_args(SEED_FINETUNE.split())
    assert (ft.layer_decay, ft.drop_path, ft.mixup, ft.cutmix, ft.input_size, ft.global_pool) == \
        (0.65, 0.1, 0.8, 1.0, 224, True)
    assert (ft.aa, ft.smoothing, ft.remode, ft.min_lr, ft.warmup_epochs) == \
        ("rand-m9-mstd0.5-inc1", 0.1, "pixel", 1e-6, 5)
    lp = main_linprobe.parse_args(SEED_LINPROBE.split())
    assert (lp.global_pool, lp.batch_size, lp.weight_decay, lp.blr, lp.warmup_epochs) == (False, 512, 0.0, 0.1, 10)
    ev = main_finetune.parse_args(SEED_EVAL.split())
    assert ev.eval and ev.resume == "mae_finetuned_vit_base.pth"


def test_odd_batch_with_mixup_is_an_argparse_error():
    out = run_script("main_finetune.py", "--mixup", "0.8", "--batch_size", "3")
    assert out.returncode == 2 and "even batch size" in out.stderr


def test_other_architecture_names_the_keys(dataset, tmp_path):
    out = run_script("main_finetune.py", "--model", "vit_tiny_patch4", "--finetune", golden("mae_tiny.pth"),
                     *_common(dataset, str(tmp_path / "o"), "--epochs", "1"))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "mae_tiny.pth does not fit" in last and "cls_token [1, 1, 64] vs model" in last


def test_too_few_classes_flag(dataset, tmp_path):
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4",
                     *_common(dataset, str(tmp_path / "o"), "--nb_classes", "2"))
    assert out.returncode == 1 and "--nb_classes is 2" in out.stderr


def test_scripts_run_from_elsewhere(tmp_path):
    out = run_script(os.path.join(ROOT, "main_finetune.py"), "--help")
    assert out.returncode == 0 and "--layer_decay" in out.stdout
