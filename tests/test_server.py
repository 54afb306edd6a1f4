"""variator-serve: a real Ray Serve app on loopback, a tiny model, every answer checked.

One server (a `python -m variator_jax.serve_app` subprocess, as a user starts it) serves the
whole module: its answers are compared with `vj.generate` and `vj.forward` on the same
inputs and ratio, every bad request gets its status and one line, a burst beyond the queue
bound gets 503 with Retry-After, and SIGTERM stops it (the last test).
"""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "stdlib_docs"  # Eight label words with distinct first bytes: ByT5 can score them.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url, body=None, raw: bytes | None = None, timeout=60):
    """-> (status, parsed JSON body, headers) of a GET (no body) or POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"raw": text.decode(errors="replace")}
        return e.code, payload, dict(e.headers)


@pytest.fixture(scope="module")
def bank_files(tmp_path_factory):
    """A tiny random HF T5 with ByT5's tokenizer saved beside it, and k = 2, 4 plugins."""
    import jax
    import transformers

    import variator_jax as vj
    from hf_reference import build_hf_t5, save_hf_dir
    root = tmp_path_factory.mktemp("bank")
    backbone_dir = save_hf_dir(build_hf_t5("v1_0", vocab_size=384, d_model=32, d_ff=64),
                               str(root / "backbone"), "v1_0")
    transformers.ByT5Tokenizer().save_pretrained(backbone_dir)
    cfg, backbone = vj.load_hf_t5(backbone_dir)
    plugins = []
    for k in (2, 4):
        pcfg = vj.PluginConfig(ratio=k, bottleneck=8)
        vj.save_plugin(str(root / f"k{k}"), pcfg, vj.init_plugin(jax.random.key(k), cfg, pcfg),
                       backbone_id=vj.backbone_identity(cfg, backbone))
        plugins.append(str(root / f"k{k}"))
    return backbone_dir, plugins


@pytest.fixture(scope="module")
def server(bank_files, tmp_path_factory):
    """The running server: (base URL, metrics URL, process). Stopped by the last test."""
    backbone_dir, plugins = bank_files
    port, metrics_port = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "variator_jax.serve_app", "--backbone", backbone_dir,
         "--plugins", ",".join(plugins), "--task", TASK, "--port", str(port),
         "--metrics-port", str(metrics_port), "--batch-sizes", "1,4", "--lengths", "64",
         "--max-new-tokens", "6", "--max-ongoing", "4", "--max-queued", "2",
         "--profile-repeats", "1", "--budget-ms", "5000"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ROOT})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        if "serving on" in log.read():
            break
        time.sleep(1)
    log.seek(0)
    output = log.read()
    if "serving on" not in output:
        proc.kill()
        pytest.fail(f"variator-serve did not start:\n{output[-3000:]}")
    yield url, f"http://127.0.0.1:{metrics_port}/metrics", proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True)


@pytest.fixture(scope="module")
def reference(bank_files):
    """(cfg, backbone, plugins by ratio, tokenizer) loaded in the test process."""
    import variator_jax as vj
    backbone_dir, plugin_dirs = bank_files
    cfg, backbone = vj.load_hf_t5(backbone_dir)
    plugins = {1: None}
    for d in plugin_dirs:
        pcfg, params = vj.load_plugin(d, cfg=cfg, backbone=backbone)
        plugins[pcfg.ratio] = (pcfg, params)
    return cfg, backbone, plugins, vj.load_tokenizer(None, backbone_dir)


def _batch(tokenizer, texts):
    rows = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
            for t in texts]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, (ids > 0).astype(np.int32)


TEXTS = ["Return the absolute value of x.", "Close the socket.", "Parse an e-mail header"]


@pytest.mark.parametrize("ratio", [1, 2, 4, None])
def test_generate_equals_vj_generate(server, reference, ratio):
    import variator_jax as vj
    url = server[0]
    body = {"inputs": TEXTS, "max_new_tokens": 5, **({"ratio": ratio} if ratio else {})}
    status, out, _ = _call(f"{url}/v1/generate", body)
    assert status == 200, out
    assert set(out) >= {"outputs", "ratio", "ratios", "queue_ms", "compute_ms", "batches"}
    if ratio is not None:
        assert out["ratios"] == [ratio] * len(TEXTS)
    cfg, backbone, plugins, tok = reference
    expected = []
    # The ratio the server chose, input by input.
    for text, r in zip(TEXTS, out["ratios"], strict=True):
        ids, mask = _batch(tok, [text])
        tokens = np.asarray(vj.generate(cfg, backbone, ids, mask, 5, plugin=plugins[r]))
        expected.append(tok.decode(tokens[0], skip_special_tokens=True))
    assert out["outputs"] == expected
    assert out["compute_ms"] > 0 and out["queue_ms"] >= 0
    assert len(out["batches"]) == len(TEXTS) and min(out["batches"]) >= 1


def test_classify_equals_verbalizer_scores(server, reference):
    import jax.numpy as jnp

    import variator_jax as vj
    from variator_jax import data as data_lib
    status, out, _ = _call(f"{server[0]}/v1/classify", {"inputs": TEXTS, "ratio": 2})
    assert status == 200, out
    cfg, backbone, plugins, tok = reference
    task = data_lib.get_task(TASK)
    texts = [task.format({"text": t, "label": -1})[0] for t in TEXTS]
    ids, mask = _batch(tok, texts)
    logits = vj.forward(cfg, backbone, ids, mask, jnp.zeros((len(ids), 1), jnp.int32),
                        plugin=plugins[2])["logits"][:, 0]
    logits = np.asarray(logits)[:, task.verbalizer_ids(tok)]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert out["labels"] == [task.labels[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose(out["scores"], probs, atol=1e-4)
    assert out["ratio"] == 2


@pytest.mark.parametrize("path,raw,status,message", [
    ("generate", b"{bad", 400, "not valid JSON"),
    ("generate", b"[1, 2]", 400, "JSON object"),
    ("generate", b"{}", 400, "'inputs' must be a non-empty list"),
    ("generate", b'{"inputs": []}', 400, "'inputs' must be a non-empty list"),
    ("generate", b'{"inputs": "text"}', 400, "'inputs' must be a non-empty list"),
    ("generate", b'{"inputs": [3]}', 400, "inputs[0] must be a string"),
    ("generate", b'{"inputs": ["a"], "max_new_tokens": 0}', 400, "'max_new_tokens'"),
    ("generate", b'{"inputs": ["a"], "max_new_tokens": 7}', 400, "[1, 6]"),
    ("generate", b'{"inputs": ["a"], "max_new_tokens": "4"}', 400, "'max_new_tokens'"),
    ("generate", b'{"inputs": ["a"], "ratio": 3}', 400, "'ratio' must be one of [1, 2, 4]"),
    ("generate", b'{"inputs": ["a"], "ratio": true}', 400, "'ratio'"),
    ("generate", b'{"inputs": ["a"], "temperature": 1}', 400, "unknown field 'temperature'"),
    ("generate", b'{"inputs": ["' + b"x" * 70 + b'"]}', 413, "longest bucket is 64"),
    ("classify", b'{"inputs": [{"txt": "a"}]}', 400, "inputs[0].text must be a string"),
    ("classify", b'{"inputs": ["a"], "max_new_tokens": 3}', 400, "unknown field"),
])
def test_bad_requests_get_their_status_and_one_line(server, path, raw, status, message):
    code, out, _ = _call(f"{server[0]}/v1/{path}", raw=raw)
    assert code == status, out
    assert set(out) == {"error"} and message in out["error"], out
    assert "\n" not in out["error"]


def test_admission_sheds_what_would_miss_the_budget():
    """The predicted wait: the queue ahead and the request itself, FIFO in full batches at the
    most compression (pinned: its own ratio), from the profile. Past shed_x x budget: 503."""
    from variator_jax import server as server_lib
    from variator_jax.engine import Bucket
    from variator_jax.policy import AdaptivePolicy, LatencyProfile, PolicyConfig
    from variator_jax.serving import RateMeter
    profile = LatencyProfile({(r, Bucket(b, 64)): (0.1 if r == 1 else 0.04) * b / 4
                              for r in (1, 4) for b in (1, 4)})
    bank = server_lib.Bank.__new__(server_lib.Bank)  # The admission logic alone: no engines.
    bank.spec = server_lib.ServeSpec(backbone="", batch_sizes=(1, 4), lengths=(64,))
    bank.profiles = {"classify": profile}
    bank.policies = {"classify": AdaptivePolicy(profile, PolicyConfig(0.25, max_batch=4))}
    bank.meters, bank.pending = {"classify": RateMeter(1.0)}, {"classify": {}}
    bank.slowdown = {"classify": 1.0}

    def item(ratio=None):
        return server_lib.Item(10.0, np.ones(30, np.int32), ratio)

    for _ in range(6):  # 6 waiting: a batch of 4, then 2 + the new one padded into bucket 4.
        bank.admit("classify", [item()], now=10.0)
    assert bank.predicted_wait("classify", [item()], 10.0) == pytest.approx(0.04 + 0.04)
    assert bank.predicted_wait("classify", [item(1)], 10.0) == pytest.approx(0.1 + 0.1)
    bank.admit("classify", [item()], now=10.0)  # 0.07 s <= 0.25 s: queued.
    assert len(bank.pending["classify"]) == 7
    with pytest.raises(server_lib.HTTPError) as e:  # Pinned uncompressed, 0.15 s late already.
        bank.admit("classify", [item(1)], now=10.15)
    assert (e.value.status, e.value.retry_after) == (503, 1)
    assert "would wait 350 ms" in str(e.value)
    assert len(bank.pending["classify"]) == 7  # A refused request is not queued.
    # Batches measured at twice their profiled time: predictions follow (moving average).
    for _ in range(40):
        bank.calibrate("classify", measured_s=0.08, profiled_s=0.04)
    assert bank.slowdown["classify"] == pytest.approx(2.0, rel=1e-3)
    assert bank.policies["classify"].slowdown == bank.slowdown["classify"]
    # 7 waiting + 1: two full batches at k = 4, each twice as long as profiled.
    assert bank.predicted_wait("classify", [item()], 10.0) == pytest.approx(2 * 0.08, rel=1e-3)
    policy = bank.policies["classify"]
    assert policy.service_s(4, np.full(4, 30)) == pytest.approx(1.1 * 2 * 0.04, rel=1e-3)


def test_health_and_models(server):
    status, health, _ = _call(f"{server[0]}/healthz")
    assert status == 200 and health["status"] == "ok" and health["ratios"] == [1, 2, 4]
    assert health["compiled"] == 3 * 2 * 2  # Ratios x buckets x endpoints, all ahead of time.
    assert health["compiles_since_start"] == 0  # After all the requests above.
    status, models, _ = _call(f"{server[0]}/v1/models")
    assert status == 200
    assert models["ratios"] == [1, 2, 4] and models["task"]["name"] == TASK
    assert [b["batch"] for b in models["buckets"]] == [1, 4]
    entries = models["profiles"]["classify"]["entries"]
    assert ({(e["ratio"], e["batch"]) for e in entries}
            == {(r, b) for r in (1, 2, 4) for b in (1, 4)})
    assert models["backbone"]["fingerprint"] and models["budget_ms"]["generate"] > 0


def test_overload_is_shed_with_503_and_every_accepted_request_answered(server):
    """60 requests at once against 4 in the replica + 2 queued: the rest get 503."""
    url = server[0]
    body = {"inputs": ["Return the absolute value of x."], "max_new_tokens": 6}
    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        results = list(pool.map(lambda _: _call(f"{url}/v1/generate", body), range(60)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 6, codes
    for code, out, headers in results:
        if code == 503:
            assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
        else:
            assert len(out["outputs"]) == 1
    status, _, _ = _call(f"{url}/v1/generate", body)  # Still serving afterwards.
    assert status == 200


def test_prometheus_metrics(server):
    """Ray's agent exports the server's own metrics beside Ray Serve's; each process pushes
    its own every few seconds, so poll until all have arrived."""
    _call(f"{server[0]}/v1/classify", {"inputs": ["Close the socket."]})
    _call(f"{server[0]}/v1/classify", {"inputs": []})
    wanted = ("ray_variator_requests_total", 'status="400"', "ray_variator_latency_ms_bucket",
              "ray_variator_batch_size_bucket", "ray_serve_num_http_requests")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(server[1], timeout=10).read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert [name for name in wanted if name not in text] == []


def test_sigterm_stops_within_30_s(server):
    proc, log = server[2], server[3]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 0
    assert time.monotonic() - start < 30
    log.seek(0)
    assert log.read().rstrip().endswith("stopped")
