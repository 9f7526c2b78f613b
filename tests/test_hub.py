"""Released checkpoints by name, against a local HTTP server on 127.0.0.1 standing in for the download host:
progress, cache hits, resumed downloads, server errors, truncated files, concurrent processes, paddle.hub,
and class names that travel with fine-tuned models."""
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import paddle
import pytest

from conftest import ROOT, golden
from data import make_train_val
from helpers import run_script, tiny_mae
from util import hub
from util.errors import DownloadError
from util.weights import load_checkpoint

MAE = golden("mae_tiny.pth")  # the official format, with its decoder: served as mae_visualize_vit_base
NAME = "mae_visualize_vit_base"


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok/PATH serves the file (with HTTP ranges), /cut/PATH ends the connection halfway, /error/PATH is a
    server error, /bad/PATH serves the first half of the file as if it were whole."""
    files, requests = {}, []

    def do_GET(self):
        mode, path = self.path.strip("/").split("/", 1)
        type(self).requests.append((mode, path, self.headers.get("Range")))
        if mode == "error" or path not in self.files:
            self.send_error(500 if mode == "error" else 404)
            return
        data = self.files[path]
        if mode == "bad":
            data = data[:len(data) // 2]
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:len(data) // 2] if mode == "cut" else data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    Handler.files = {f"visualize/{NAME}.pth": open(MAE, "rb").read(),
                     "finetune/mae_finetuned_vit_base.pth": open(golden("vit_tiny_gp.pth"), "rb").read()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    Handler.requests = []
    monkeypatch.setenv("MAE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MAE_MIRROR", server + "/ok")
    return tmp_path / "cache"


def cache_files(cache):
    return sorted(p for p in os.listdir(cache) if p != "partial") + sorted(
        p for p in os.listdir(cache / "partial") if not p.endswith(".lock"))


def test_download_convert_and_cache_hit(cache, capfd):
    path = hub.resolve(NAME)
    assert path == str(cache / f"{NAME}.pd") and cache_files(cache) == [f"{NAME}.pd"]
    err = capfd.readouterr().err
    assert f"Downloading {os.environ['MAE_MIRROR']}/visualize/{NAME}.pth" in err and "MiB/s" in err and "s left" in err
    a, b = load_checkpoint(path)["model"], load_checkpoint(MAE)["model"]
    assert all(np.array_equal(a[k], b[k]) for k in b)
    assert hub.resolve(NAME + ".pth") == path and len(Handler.requests) == 1  # the second call is a cache hit


def test_interrupted_download_continues_where_it_stopped(cache, server, monkeypatch):
    monkeypatch.setenv("MAE_MIRROR", server + "/cut")
    with pytest.raises(DownloadError, match="run again to continue the download"):
        hub.resolve(NAME)
    assert cache_files(cache) == [f"{NAME}.pth.part"]  # nothing in the cache proper
    half = os.path.getsize(cache / "partial" / f"{NAME}.pth.part")
    monkeypatch.setenv("MAE_MIRROR", server + "/ok")
    hub.resolve(NAME)
    assert Handler.requests[-1] == ("ok", f"visualize/{NAME}.pth", f"bytes={half}-")
    assert cache_files(cache) == [f"{NAME}.pd"]
    assert all(np.array_equal(v, load_checkpoint(MAE)["model"][k]) for k, v in
               load_checkpoint(str(cache / f"{NAME}.pd"))["model"].items())


@pytest.mark.parametrize("mode,message", [("error", "HTTP 500"), ("bad", "not a readable checkpoint")])
def test_failed_downloads_leave_nothing(cache, server, monkeypatch, mode, message):
    monkeypatch.setenv("MAE_MIRROR", server + "/" + mode)
    with pytest.raises(DownloadError, match=message) as e:
        hub.resolve(NAME)
    assert f"{server}/{mode}/visualize/{NAME}.pth" in str(e.value) and str(cache / f"{NAME}.pth") in str(e.value)
    assert cache_files(cache) == []


def test_published_md5_is_checked(cache):
    with pytest.raises(DownloadError, match="is not the published 1b25e9"):
        hub.resolve("mae_finetuned_vit_base")
    assert cache_files(cache) == []


def test_damaged_cache_file_is_fetched_again(cache):
    path = hub.resolve(NAME)
    open(path, "wb").write(b"not a checkpoint")
    assert hub.resolve(NAME) == path and len(Handler.requests) == 2
    load_checkpoint(path)


def test_a_file_put_in_the_cache_by_hand_is_used(cache):
    os.makedirs(cache)
    shutil.copy(MAE, cache / f"{NAME}.pth")
    assert hub.resolve(NAME) == str(cache / f"{NAME}.pd") and Handler.requests == []


def test_two_processes_download_once(cache):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from util import hub; print(hub.resolve({NAME!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(cache / f"{NAME}.pd")] * 2
    assert len(Handler.requests) == 1


def test_scripts_take_names_and_say_what_failed(cache, server, tmp_path, monkeypatch):
    out = run_script("main_visualize.py", "--model", "mae_vit_micro_patch4", "--resume", NAME, "--img_path",
                     os.path.join(ROOT, "demo", "chelsea.png"), "--output", str(tmp_path / "r.png"))
    assert out.returncode == 0 and os.path.isfile(tmp_path / "r.png"), out.stderr[-2000:]
    converted = run_script("-m", "util.convert_weights", NAME, str(tmp_path / "m.pd"))
    assert converted.returncode == 0 and len(Handler.requests) == 1
    monkeypatch.setenv("MAE_MIRROR", server + "/error")
    failed = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--finetune", "mae_pretrain_vit_large",
                        "--data_path", str(tmp_path))
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert last.startswith(f"error: {server}/error/pretrain/mae_pretrain_vit_large.pth: HTTP 500")
    assert str(cache / "mae_pretrain_vit_large.pth") in last


def test_paddle_hub_load_equals_loading_the_file(cache):
    model = paddle.hub.load(ROOT, "mae_vit_micro_patch4", source="local", checkpoint=NAME)
    direct = tiny_mae(norm_pix_loss=True)
    direct.eval()
    x, noise = paddle.randn([2, 3, 32, 32]), paddle.rand([2, 64])
    assert np.array_equal(model(x, 0.75, noise)[1].numpy(), direct(x, 0.75, noise)[1].numpy())
    assert "vit_base_patch16" in paddle.hub.list(ROOT, source="local")
    with pytest.raises(ValueError, match="no released checkpoint"):
        paddle.hub.load(ROOT, "vit_micro_patch4", source="local", pretrained=True)


@pytest.mark.slow
def test_class_names_travel_with_the_fine_tuned_model(tmp_path):
    data = make_train_val(str(tmp_path / "data"), 3, 4, 2)
    out = str(tmp_path / "ft")
    res = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "3", "--data_path", data,
                     "--output_dir", out, "--log_dir", "", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
                     "--num_workers", "0", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = os.path.join(out, "checkpoint-0.pd")
    image = os.path.join(data, "val", "class_1", "img_0.png")
    exported = str(tmp_path / "export" / "m")
    assert run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", ckpt, "--output", exported
                      ).returncode == 0
    assert json.load(open(exported + ".info"))["class_names"] == ["class_0", "class_1", "class_2"]
    for source in (["--resume", ckpt], ["--exported", exported]):
        res = run_script("main_infer.py", "--model", "vit_micro_patch4", *source, "--img_path", image, "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        assert sorted(json.loads(res.stdout.strip().splitlines()[-1])["topk_names"]) == ["class_0", "class_1",
                                                                                           "class_2"]
    model = paddle.hub.load(ROOT, "vit_micro_patch4", source="local", checkpoint=ckpt)
    assert model.class_names == ["class_0", "class_1", "class_2"]


def test_cache_dir_flag_overrides_mae_home(cache, tmp_path):
    other = tmp_path / "elsewhere"
    out = run_script("-m", "util.convert_weights", NAME, str(tmp_path / "m.pd"), "--cache_dir", str(other))
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(other)) == [f"{NAME}.pd", "partial"]
    assert not os.path.exists(cache / f"{NAME}.pd")


@pytest.mark.parametrize("mirror,message", [("notaurl", "not a download address"),
                                            ("http://127.0.0.1:1", "Connection refused")])
def test_unreachable_or_malformed_mirror(cache, monkeypatch, mirror, message):
    monkeypatch.setenv("MAE_MIRROR", mirror)
    with pytest.raises(DownloadError, match=message):
        hub.resolve(NAME)
    assert cache_files(cache) == []


def test_hubconf_names_every_package_it_imports():
    """The packages the project's modules import at load time, followed from hubconf.py, are its dependencies
    (paddle.hub checks them before loading)."""
    import ast
    import hubconf
    seen, todo, packages = set(), ["hubconf"], set()
    while todo:
        name = todo.pop()
        path = os.path.join(ROOT, *name.split(".")) + ".py"
        if name in seen or not os.path.isfile(path):
            continue
        seen.add(name)
        for node in ast.parse(open(path).read()).body:  # module level: what importing it runs
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names += [f"{node.module}.{a.name}" for a in node.names]
            for full in names:
                top = full.split(".")[0]
                if os.path.exists(os.path.join(ROOT, top + ".py")) or os.path.isdir(os.path.join(ROOT, top)):
                    todo.append(full)
                elif top not in sys.stdlib_module_names:
                    packages.add(top)
    assert {"hubconf", "models_vit", "util.checkpoint"} <= seen
    assert packages == set(hubconf.dependencies)
